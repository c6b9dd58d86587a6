#!/usr/bin/env bash
# Install replicore on a target machine (as root), from a checkout after packaging/build.sh:
#
#   sudo packaging/install.sh            # then: systemctl enable --now replicore
#
# Puts in place:
#   /usr/local/bin/replicore                 the one-file executable (BINARY=path to override)
#   /etc/systemd/system/replicore.service    the unit (replaced: it belongs to the package)
#   /etc/replicore/replicore.toml            the config, only if there is none yet, with
#                                            state_dir = "/var/lib/replicore"
# and creates the system user and group `replicore` (no login, no home of its own).
# The state directory /var/lib/replicore is made by systemd (StateDirectory=).
#
# DESTDIR=/some/root stages the files there instead (for packaging and tests): the user is
# then neither created nor given the config, and systemd is not told.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BINARY="${BINARY:-$ROOT/dist/replicore}"
DESTDIR="${DESTDIR:-}"
USER_NAME=replicore
STATE_DIR=/var/lib/replicore

if [[ ! -x "$BINARY" ]]; then
    echo "install.sh: no executable at $BINARY; run packaging/build.sh first" >&2
    exit 2
fi
if [[ -z "$DESTDIR" && "$(id -u)" -ne 0 ]]; then
    echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
    exit 2
fi

if [[ -z "$DESTDIR" ]] && ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "replicore replication target" "$USER_NAME"
    echo "created system user $USER_NAME"
fi

install -D -m 0755 "$BINARY" "$DESTDIR/usr/local/bin/replicore"
install -D -m 0644 "$ROOT/systemd/replicore.service" "$DESTDIR/etc/systemd/system/replicore.service"

config="$DESTDIR/etc/replicore/replicore.toml"
install -d -m 0750 "$DESTDIR/etc/replicore"
if [[ -e "$config" ]]; then
    echo "kept the existing $config (the shipped one documents every option: $ROOT/config/replicore.toml)"
else
    tmp="$(mktemp)"
    sed "s|^# state_dir = .*|state_dir = \"$STATE_DIR\"|" "$ROOT/config/replicore.toml" > "$tmp"
    grep -q "^state_dir = \"$STATE_DIR\"" "$tmp"
    install -m 0640 "$tmp" "$config"
    rm -f "$tmp"
    echo "wrote $config"
fi
if [[ -z "$DESTDIR" ]]; then
    chgrp "$USER_NAME" "$DESTDIR/etc/replicore" "$config"
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
        echo "installed; start it with: systemctl enable --now replicore"
    else
        echo "installed; systemd is not running here, so the unit was not loaded"
    fi
fi
"$DESTDIR/usr/local/bin/replicore" check-config --config "$config"
