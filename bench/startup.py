"""Start-up benchmark: ``qcnode serve`` start → port accepting → C-ECHO Success, with a
large spool.

Run: ``.venv/bin/python bench/startup.py [--instances 100000] [--series-size 200]
[--rounds 3] [--home DIR]``.

1. Builds (or reuses, with ``--home`` pointing at an earlier build) a node home holding
   ``--instances`` small spooled CT instances (16×16 pixels, ~1.3 KB each) and their
   ledger rows, without the network: each file is staged and moved in with the node's
   own :class:`node.store.spool.Spool` and recorded with :meth:`Ledger.record_instances`
   (batches of 1,000), the way the journal applier does. Every series is then taken
   through the state machine to ``delivered`` (an old, fully processed spool).
2. Starts ``qcnode serve`` (embedded workers, default settings but a free port and a
   2-segment journal) ``--rounds`` times and measures, from ``Popen``: the ``listening
   on`` line, the port accepting a TCP connection, and the first C-ECHO (PS3.4 Annex A,
   pynetdicom) answered with Success; and from its log, ``node_phase``: from
   ``pipeline_started`` to ``node starting`` (ledger, journal replay, reconciliation:
   the part that may grow with the spool, without the imports and the workers' launch).
   The node is stopped with SIGTERM between rounds. Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.ledger import InstanceRecord, Ledger, SeriesState  # noqa: E402
from node.store.spool import Spool  # noqa: E402
from tests.support.net import free_port, port_open  # noqa: E402
from tests.support.spooled import move_to, spool_instance, template  # noqa: E402

ROOT_UID = "1.2.826.0.1.3680043.8.498.77"
BATCH = 1000
CONFIG = """\
[node]
port = {port}
home = "{home}"
[spool]
min_free_bytes = 0
min_free_percent = 0.0
journal_segment_bytes = 1048576
journal_segments = 2
[logging]
json = "always"
"""


def build(home: Path, instances: int, series_size: int) -> None:
    """The spool and ledger of ``instances`` delivered instances (see module doc)."""
    ledger = Ledger.open(f"sqlite:///{(home / 'ledger.sqlite3').resolve()}")
    spool = Spool(home / "spool", home)
    ds = template()
    started = time.perf_counter()
    batch: list[InstanceRecord] = []
    series_uids: list[str] = []
    for i in range(instances):
        s, n = divmod(i, series_size)
        study, series = f"{ROOT_UID}.1.{s // 4}", f"{ROOT_UID}.2.{s}"
        if n == 0:
            series_uids.append(series)
        batch.append(spool_instance(spool, ds, study, series, f"{ROOT_UID}.3.{s}.{n}",
                                    f"bench-{s}"))
        if len(batch) == BATCH or i == instances - 1:
            errors = [e for e in ledger.record_instances(batch) if e is not None]
            if errors:
                raise RuntimeError(f"ledger: {errors[0]}")
            batch = []
    spool.sync()
    for series in series_uids:
        move_to(ledger, series, SeriesState.DELIVERED)
    ledger.close()
    print(f"built {instances} instances in {len(series_uids)} series in "
          f"{time.perf_counter() - started:.1f} s", flush=True)


def echo_ok(port: int) -> bool:
    """One C-ECHO (PS3.4 Annex A) to the node; True on Success."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def one_start(home: Path, work: Path) -> dict[str, float]:
    """Start serve, time the readiness milestones, stop it."""
    port = free_port()
    config = work / "qcnode.toml"
    config.write_text(CONFIG.format(port=port, home=home), encoding="utf-8")
    log_path = work / "node.log"
    with log_path.open("wb") as log_fh:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log_fh, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the embedded workers share this stdout
            if line.startswith("listening on"):
                break
        else:
            raise RuntimeError(f"serve did not start: {log_path.read_text()[-2000:]}")
        listening = time.perf_counter() - start
        while not port_open(port):
            time.sleep(0.005)
        accepting = time.perf_counter() - start
        while not echo_ok(port):
            time.sleep(0.005)
        echoed = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    events = {e["event"]: e for e in (json.loads(x) for x in log_path.read_text().splitlines()
                                      if x.startswith("{"))}
    result = {"listening": listening, "accepting": accepting, "echo_ok": echoed}
    if "node starting" in events and "pipeline_started" in events:
        # The node's own start (ledger, journal, reconciliation), without the imports
        # and the embedded workers' launch before it.
        result["node_phase"] = (_stamp(events["node starting"])
                                - _stamp(events["pipeline_started"]))
    return result


def _stamp(event: dict[str, str]) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--series-size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=None,
                        help="reuse (or build once into) this home directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcnode-startup-") as tmp:
        work = Path(tmp)
        home = args.home.resolve() if args.home else work / "home"
        if not (home / "ledger.sqlite3").exists():
            home.mkdir(parents=True, exist_ok=True)
            build(home, args.instances, args.series_size)
        files = sum(len(f) for _, _, f in os.walk(home / "spool"))
        print(f"home {home}: {files} spool files", flush=True)
        rounds = []
        for r in range(args.rounds):
            result = one_start(home, work)
            rounds.append(result)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.items()),
                  flush=True)
        if rounds:
            print("median: " + ", ".join(
                f"{k} {statistics.median(r[k] for r in rounds):.2f} s" for k in rounds[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
