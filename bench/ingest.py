"""Ingest benchmark: DCMTK storescu → qcnode, DCMTK storescp and Orthanc, in one run.

Run ``.venv/bin/python bench/ingest.py [--images 500] [--rounds 3] [--rss-images 2000]``.
It writes a 512×512 CT series with pydicom, sends it with ``/usr/bin/storescu``
(``TCP_NODELAY=1``) to each receiver on 127.0.0.1 (free ports, temporary homes), and
prints images/s and MB/s for each and the ratio qcnode / storescp; then 20 concurrent
storescu senders to qcnode and to ``storescp --fork`` (the same 20 sender start-ups,
~30 ms of CPU each, on both sides); then the listener's RSS while it receives
``--rss-images`` distinct images. Each round measures every receiver once, back to
back (a fresh qcnode each time), so a round's ratio compares runs under the same
machine load; the medians over the rounds are printed at the end with the load average.

Every receiver is measured in its steady state, as a modality meets it: after it
started, it receives a 10-image warm-up series (its own UIDs), and the clock starts
once it and its child processes are idle: less than a fifth of a core used over half a
second (an idle qcnode tree polls for ~10 % of a core: the completion monitor and the
embedded workers' broker). A fresh ``qcnode serve`` spends its first seconds starting
two Celery worker processes, which import for several seconds of CPU; timing a sender
against that measured start-up on a 2-core machine, not ingest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.ledger import Ledger, SeriesState  # noqa: E402
from tests.support.dcmtk import write_ct_series  # noqa: E402
from tests.support.net import free_port, wait_for, wait_port  # noqa: E402
from tests.support.node import default_sections, start_node, write_config  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
#: Series states in which the pipeline has nothing more to do.
FINAL = {SeriesState.DELIVERED, SeriesState.FAILED, SeriesState.IGNORED}


def send(port: int, files: list[Path], aec: str, aet: str = "BENCH") -> float:
    """Seconds storescu takes to send ``files`` in one association."""
    start = time.perf_counter()
    subprocess.run(
        ["/usr/bin/storescu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port),
         *map(str, files)], env=ENV, check=True, capture_output=True,
    )
    return time.perf_counter() - start


def send_parallel(port: int, groups: list[list[Path]], aec: str) -> float:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(["/usr/bin/storescu", "-aet", f"BENCH{i}", "-aec", aec, "127.0.0.1",
                          str(port), *map(str, g)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        for i, g in enumerate(groups)
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError("a concurrent storescu failed")
    return time.perf_counter() - start


@contextmanager
def qcnode(tmp: Path, *, store_only: bool = False) -> Iterator[tuple[int, int, str]]:
    """A ``qcnode serve``; ``store_only``: one rule that stores and ignores every series
    (no assessment runs in the process, so its RSS is the receiving side's)."""
    tmp.mkdir(parents=True, exist_ok=True)
    home = tmp / "qc"
    sections = default_sections(home, free_port())
    sections["logging"] = {"level": "WARNING", "json": "always"}
    sections["spool"] = {"min_free_bytes": 0, "min_free_percent": 0.0}  # journal: defaults
    tables = {"rules": [{"name": "keep", "action": "store"}]} if store_only else {}
    config = write_config(tmp / "qcnode.toml", sections, tables)
    node = start_node(config, home, tmp / "qcnode.log")
    try:
        yield node.port, node.proc.pid, node.ledger_url
    finally:
        node.stop()


@contextmanager
def storescp(tmp: Path, *, fork: bool = False) -> Iterator[tuple[int, int]]:
    """DCMTK storescp; ``fork``: a child process per association (``--fork``), so that
    concurrent senders are served concurrently."""
    port = free_port()
    out = tmp / ("storescp-fork" if fork else "storescp")
    out.mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", *(["--fork"] if fork else []), "-od",
                             str(out), "-aet", "STORESCP", str(port)], env=ENV)
    try:
        wait_port(port)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def orthanc(tmp: Path) -> Iterator[tuple[int, int]]:
    port, http = free_port(), free_port()
    store = tmp / "orthanc"
    store.mkdir()
    config = {
        "Name": "bench", "StorageDirectory": str(store), "IndexDirectory": str(store),
        "HttpPort": http, "DicomPort": port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "DicomCheckModalityHost": True,
        "DicomModalities": {"bench": ["BENCH", "127.0.0.1", 104]},
        "DicomAlwaysAllowStore": True, "AuthenticationEnabled": False,
    }
    path = tmp / "orthanc.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(["/usr/sbin/Orthanc", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=60)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of all its descendants still running."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    total = 0.0
    for member in tree:
        try:
            total += cpu_seconds(member)
        except OSError:
            continue
    return total


def settle(pid: int, *, quiet: float = 0.5, timeout: float = 120.0) -> None:
    """Wait until ``pid`` and its descendants used < 0.2 core over ``quiet`` s."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = tree_cpu_seconds(pid)
        if now - last < 0.2 * quiet:
            return
        last = now
    raise TimeoutError(f"process {pid} still busy after {timeout} s")


def report(name: str, count: int, size: int, seconds: float) -> float:
    rate = count / seconds
    print(f"{name:<28} {count:>5} images {seconds:7.2f} s {rate:8.1f} img/s "
          f"{size / seconds / 1e6:8.1f} MB/s", flush=True)
    return rate


def measure(name: str, files: list[Path], runner: Callable[[], float]) -> float:
    """Run ``runner`` from a clean page cache state: the previous receiver's dirty
    pages (hundreds of MB) would otherwise be written back during this run and slow
    whichever receiver comes later in the round (seen: storescp 1,090 → 494 img/s)."""
    size = sum(f.stat().st_size for f in files)
    os.sync()
    return report(name, len(files), size, runner())


def warm_up(port: int, pid: int, warm: list[Path], aec: str,
            ledger: Ledger | None = None) -> None:
    """Send the warm-up series, wait until it is applied (qcnode) and all is idle."""
    send(port, warm, aec)
    if ledger is not None:  # qcnode: received, completed, assessed, reported
        wait_for(lambda: ledger.open_associations() == 0, timeout=60, interval=0.01,
                 what="the warm-up series applied")
        wait_for(lambda: not any(n for state, n in ledger.series_counts().items()
                                 if state not in FINAL), timeout=180, interval=0.1,
                 what="the warm-up series through the pipeline")
    settle(pid)


def one_round(tmp: Path, series: list[Path], warm: list[Path]) -> dict[str, float]:
    """storescp, Orthanc, qcnode with 1 and with 20 senders, back to back."""
    rates: dict[str, float] = {}
    tmp.mkdir(parents=True)
    with storescp(tmp) as (port, pid):
        warm_up(port, pid, warm, "STORESCP")
        rates["storescp"] = measure("DCMTK storescp", series,
                                    lambda: send(port, series, "STORESCP"))
    with storescp(tmp, fork=True) as (port, pid):
        warm_up(port, pid, warm, "STORESCP")
        groups = [series[i::20] for i in range(20)]
        rates["storescp 20"] = measure("DCMTK storescp --fork (20)", series,
                                       lambda: send_parallel(port, groups, "STORESCP"))
    with orthanc(tmp) as (port, pid):
        warm_up(port, pid, warm, "ORTHANC")
        rates["orthanc"] = measure("Orthanc", series, lambda: send(port, series, "ORTHANC"))
    for name, senders in (("qcnode 1", 1), ("qcnode 20", 20)):
        groups = [series[i::senders] for i in range(senders)]
        with qcnode(tmp / name.replace(" ", "")) as (port, pid, url), Ledger(url) as ledger:
            warm_up(port, pid, warm, "QCNODE", ledger)
            before = cpu_seconds(pid)
            applied: list[float] = []

            def run(port: int = port, groups: list[list[Path]] = groups,
                    ledger: Ledger = ledger, applied: list[float] = applied) -> float:
                start = time.perf_counter()
                if len(groups) == 1:
                    seconds = send(port, groups[0], "QCNODE")
                else:
                    seconds = send_parallel(port, groups, "QCNODE")
                wait_for(lambda: ledger.open_associations() == 0, timeout=120, interval=0.01,
                         what="every image applied to the spool and the ledger")
                applied.append(time.perf_counter() - start)
                return seconds

            rates[name] = measure(
                f"qcnode ({senders} sender{'s' if senders > 1 else ''})", series, run
            )
            cpu_ms = (cpu_seconds(pid) - before) / len(series) * 1000
            print(f"{'':<28} until every image is in the spool and the ledger: "
                  f"{len(series) / applied[0]:.1f} img/s; listener CPU {cpu_ms:.2f} ms/image "
                  "(all of it, applier included)", flush=True)
    print(f"ratio qcnode / storescp: {rates['qcnode 1'] / rates['storescp']:.2f} (1 sender), "
          f"{rates['qcnode 20'] / rates['storescp']:.2f} (20 senders); 20 senders to each: "
          f"{rates['qcnode 20'] / rates['storescp 20']:.2f}", flush=True)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-images", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qcnode-bench-"))
    try:
        series = write_ct_series(tmp / "series", args.images, size=512)
        warm = write_ct_series(tmp / "warm", 10, size=512)
        print(f"series: {len(series)} × 512×512 CT, "
              f"{sum(f.stat().st_size for f in series) / 1e6:.0f} MB; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        rounds = []
        for i in range(args.rounds):
            print(f"round {i + 1}", flush=True)
            rounds.append(one_round(tmp / f"round{i}", series, warm))
            shutil.rmtree(tmp / f"round{i}")  # 2 GB a round: do not fill the disk
        print(f"medians over {len(rounds)} rounds (load average now "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}):", flush=True)
        for name in rounds[0] if rounds else ():
            print(f"  {name:<12} {statistics.median(r[name] for r in rounds):7.1f} img/s",
                  flush=True)
        for name, ref in (("qcnode 1", "storescp"), ("qcnode 20", "storescp"),
                          ("qcnode 20", "storescp 20")) if rounds else ():
            ratio = statistics.median(r[name] / r[ref] for r in rounds)
            print(f"  ratio {name} / {ref} (median of rounds): {ratio:.2f}", flush=True)
        if args.rss_images:
            rss_run(tmp, args.rss_images, store_only=True)
            rss_run(tmp, args.rss_images, store_only=False)
    except BaseException:
        print(f"failed: logs kept in {tmp}", flush=True)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def rss_run(tmp: Path, count: int, *, store_only: bool) -> None:
    """Peak RSS of the listener process while it receives ``count`` distinct images."""
    what = ("store-only rule" if store_only
            else "default rules: each completed series is assessed in the same process")
    print(f"RSS of qcnode serve ({what}):", flush=True)
    chunks = [write_ct_series(tmp / f"rss{int(store_only)}-{i}", min(500, count - i * 500),
                              size=512)
              for i in range((count + 499) // 500)]
    with qcnode(tmp / f"c{int(store_only)}", store_only=store_only) as (port, pid, _):
        samples: list[tuple[int, int]] = []
        done = threading.Event()
        sent = [0]

        def sample() -> None:
            while not done.wait(0.25):
                samples.append((sent[0], rss_kib(pid)))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        for chunk in chunks:
            send(port, chunk, "QCNODE")
            sent[0] += len(chunk)
            print(f"  after {sent[0]:>5} images: RSS {rss_kib(pid) / 1024:6.1f} MiB", flush=True)
        done.set()
        thread.join()
        print(f"  peak RSS (VmHWM) over {sent[0]} images: "
              f"{rss_kib(pid, 'VmHWM') / 1024:.1f} MiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
