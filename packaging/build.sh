#!/usr/bin/env bash
# Build dist/replicore: one executable file holding every replicore command.
#
#   packaging/build.sh            # from the repository root or anywhere
#
# Uses the active virtualenv if there is one (CI builds in its test venv), else creates
# build/venv. Installs the project and PyInstaller there, then runs packaging/replicore.spec.
# Work files go to build/pyinstaller; the result is dist/replicore.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    if [[ ! -x build/venv/bin/python ]]; then
        python3 -m venv build/venv
    fi
    . build/venv/bin/activate
fi
python -m pip install --quiet --disable-pip-version-check "pyinstaller>=6.10,<7"
# The project's dependencies (the spec analyses the source tree itself).
python -m pip install --quiet --disable-pip-version-check -e "$ROOT"

start=$(date +%s)
python -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$ROOT/dist" --workpath "$ROOT/build/pyinstaller" \
    "$ROOT/packaging/replicore.spec"
"$ROOT/dist/replicore" --version
echo "built $ROOT/dist/replicore ($(du -h "$ROOT/dist/replicore" | cut -f1)) in $(( $(date +%s) - start )) s"
