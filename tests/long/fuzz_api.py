"""The long fuzz run: every operation of the API, generated from the server's OpenAPI
document, for as long as asked (the CI test, tests/test_fuzz_api.py, runs the same for about
a minute).

    python tests/long/fuzz_api.py --minutes 30 [--examples 500] [--keep DIR]

Starts its own server (loopback, temporary state unless --keep), builds the same world as the
authorization matrix (sources A and B with agents, images, sessions, a pending and a denied
source), then fuzzes as the anonymous caller, source A and the administrator, in rounds so
that every operation is reached early. Checks: no 5xx (other than a deliberate 503/507 with
a JSON error), no request without an answer within 10 s, no database change after a 4xx.
Prints a summary and every finding (request, answer, server traceback); exits 1 if there
were findings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import authz_helpers as az
import fuzz_helpers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument(
        "--examples", type=int, default=100_000, help="cases per operation, caller and mode"
    )
    parser.add_argument("--per-round", type=int, default=10, help="cases per unit and round")
    parser.add_argument("--keep", type=Path, help="keep the server's state in this directory")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="replicore-fuzz-"))
    started = time.monotonic()
    with az.module_server(root / "server", az.MATRIX_CONFIG) as server:
        world = az.build_world(root, server)
        document, schema = fuzz_helpers.load_schema(server)
        with fuzz_helpers.fuzzing(world, args.minutes * 60) as fuzzer:
            fuzzer.fuzz(
                schema,
                document,
                args.examples,
                ("positive", "negative"),
                per_round=args.per_round,
            )
    stats = fuzzer.stats
    elapsed = time.monotonic() - started
    print(f"fuzzed for {elapsed / 60:.1f} min: {stats.requests} requests")
    print(f"answers: {dict(sorted(stats.statuses.items()))}")
    print(f"operations reached: {len(stats.per_endpoint)}")
    for endpoint, count in sorted(stats.per_endpoint.items()):
        print(f"  {count:7d}  {endpoint}")
    print(f"server log: {server.log_path}")
    if not fuzzer.findings:
        print("no findings")
        return 0
    print(f"\n{len(fuzzer.findings)} findings:")
    for finding in fuzzer.findings:
        print(f"\n{finding}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
