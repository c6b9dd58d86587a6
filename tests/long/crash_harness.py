#!/usr/bin/env python3
"""The long crash-consistency run: at least 50 SIGKILL points (by default 60) at random
moments of pushes, commits, agent deletions, garbage collection and seed-drive consumption,
all against one real `replicore serve` whose database keeps growing from point to point.
After each kill: restart, `PRAGMA integrity_check` and `foreign_key_check`, `replicore
verify` (must be clean), finish the interrupted work, export every new image and two older
ones at random, comparing bytes; at the end every image ever pushed is exported again.
(tests/crash_helpers.py has the kill points; tests/test_crash.py runs a few in CI.)

    python tests/long/crash_harness.py [--points 60] [--seed 1] [--image-mib 16]
                                       [--workdir DIR] [--keep] [--json]

Exit status 0 when every kill point passed, 1 at the first failure (the work directory, with
the server's log and database, is then kept and named), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import RunningServer, write_config  # noqa: E402
from crash_helpers import Harness, plan_kinds  # noqa: E402

ADMIN = ("admin", "correct horse battery")
#: Sessions idle this long are discarded, and garbage must be this old to be collected.
SESSION_TIMEOUT = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=60, help="kill points (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--image-mib", type=int, default=16, help="pushed image size")
    parser.add_argument("--workdir", type=Path, help="where to work (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir on success")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.points < 1:
        parser.error("--points must be at least 1")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="replicore-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "server"
    root.mkdir(exist_ok=True)
    config = root / "replicore.toml"
    write_config(config, root / "state", f"[replication]\nsession_timeout = {SESSION_TIMEOUT}\n")
    server = RunningServer(config, root / "state", root / "server.log").start()
    started = time.monotonic()
    harness: Harness | None = None
    try:
        added = server.cli("admin", "add", ADMIN[0], "--password-stdin", stdin=ADMIN[1])
        if added.status != 0:
            raise RuntimeError(added.stderr)
        kinds = plan_kinds(random.Random(args.seed), args.points)
        harness = Harness(server, work / "harness", ADMIN, seed=args.seed, image_mib=args.image_mib)
        harness.setup(
            spare_agents=kinds.count("delete") + kinds.count("seed"),
            garbage_agents=kinds.count("gc"),
        )
        harness.run(kinds)
        harness.final_check()
    except BaseException as error:
        print(f"FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"kept {work} (server log: {root / 'server.log'})", file=sys.stderr)
        return 1
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
    summary = harness.summary() | {"seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['ok']} of {summary['killPoints']} kill points passed"
            f" ({', '.join(f'{k} {n}' for k, n in sorted(summary['byKind'].items()))});"
            f" {summary['imagesChecked']} images exported exactly; {summary['seconds']} s"
        )
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
