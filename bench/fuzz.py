"""Protocol fuzzing benchmark: ≥ 100,000 mutated association streams against a real node.

Run ``.venv/bin/python bench/fuzz.py [--seed 1] [--cases 100000] [--batch 200]
[--start 0]``. It
starts ``qcnode serve`` (free port, temporary home), captures what pynetdicom sends for
association + C-ECHO + release and association + C-STORE of a small CT + release, and
sends seeded mutations of them (:mod:`tests.support.fuzz_streams`). After every batch a
C-ECHO must succeed within 2 s and the listener's RSS must stay within 50 MiB of the
first batch's; no C-STORE-RSP may be Success for a malformed data set, and at
the end every spooled version must decode with pydicom. Prints outcome
counts, echo latency percentiles and RSS; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.fuzz_run import run, undecodable  # noqa: E402
from tests.support.fuzz_streams import capture  # noqa: E402
from tests.support.node import running_node  # noqa: E402

ECHO_LIMIT_SECONDS = 2.0
RSS_GROWTH_KIB = 50 << 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--start", type=int, default=0,
                        help="first case index (reproduce a reported case: its batch)")
    args = parser.parse_args()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, running_node(
            Path(tmp), tables={"senders": [{"ae_title": "*", "host": "127.0.0.1"}]}) as node:
        streams = capture(node.port, Path(tmp))
        started = time.monotonic()
        report = None
        for report in run(node.port, node.proc.pid, streams, seed=args.seed,
                          cases=args.cases, batch=args.batch, workers=args.workers,
                          start=args.start):
            if report.echo[-1] > ECHO_LIMIT_SECONDS:
                failures.append(f"after case {report.cases}: C-ECHO {report.echo[-1]:.2f} s")
            if report.rss[-1] - report.rss[0] > RSS_GROWTH_KIB:
                failures.append(f"after case {report.cases}: RSS {report.rss[-1]} KiB")
            if report.cases % (args.batch * 50) == 0:
                print(f"{time.monotonic() - started:.0f} s: {report.summary()}", flush=True)
        assert report is not None
        print(f"seed {args.seed}, {time.monotonic() - started:.0f} s: {report.summary()}")
        failures += report.violations
        spooled = len(list(node.spool.rglob("*.dcm")))
        bad = undecodable(node.spool)
        print(f"spooled versions: {spooled}, not decodable by pydicom: {len(bad)}")
        failures += [f"spooled, not decodable: {line}" for line in bad]
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
