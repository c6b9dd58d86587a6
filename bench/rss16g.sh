#!/usr/bin/env bash
# Peak RSS check on a 16 GiB image: both processes must stay under 300 MiB (issue 3).
# Run it with the project's Python: PYTHON=/path/to/venv/bin/python bench/rss16g.sh
# Runs bench/replicate.py (first push, 2% changed, no change, export) without the storage
# ceiling, then checks client_rss_mib and server_rss_mib of every run.  Needs about 50 GiB
# of free space in $TMPDIR and takes a long while (image generation alone is minutes).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SIZE_MIB=${SIZE_MIB:-16384}
LIMIT_MIB=${LIMIT_MIB:-300}
RESULTS=${RESULTS:-/tmp/replicore-rss16g-$(date +%Y%m%d-%H%M%S).jsonl}
start=$(date +%s)
"${PYTHON:-python3}" "$HERE/replicate.py" --size-mib "$SIZE_MIB" --no-ceiling --timeout 3600 \
    --results "$RESULTS" "$@"
echo "total $(( $(date +%s) - start )) s; results in $RESULTS"
"${PYTHON:-python3}" - "$RESULTS" "$LIMIT_MIB" <<'PY'
import json, sys
limit = float(sys.argv[2])
runs = [json.loads(l) for l in open(sys.argv[1]) if '"kind": "run"' in l]
worst = 0.0
for r in runs:
    peak = max(r["client_rss_mib"], r["server_rss_mib"])
    worst = max(worst, peak)
    print(f"{r['scenario']:<9} client {r['client_rss_mib']:7.1f} MiB  server {r['server_rss_mib']:7.1f} MiB  {r['wall_s']:8.2f} s")
print(f"peak RSS {worst:.1f} MiB, limit {limit:.0f} MiB: {'ok' if worst < limit else 'OVER'}")
sys.exit(0 if worst < limit else 1)
PY
