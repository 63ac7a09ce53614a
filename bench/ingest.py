"""Ingest benchmark: DCMTK storescu → qcnode, DCMTK storescp and Orthanc, in one run.

Run ``.venv/bin/python bench/ingest.py [--images 500] [--rounds 3] [--rss-images 2000]
[--tls]``.
It writes a 512×512 CT series with pydicom, sends it with ``/usr/bin/storescu``
(``TCP_NODELAY=1``) to each receiver on 127.0.0.1 (free ports, temporary homes), and
prints images/s and MB/s for each and the ratio qcnode / storescp; then 20 concurrent
storescu senders (25 images each) to qcnode and to ``storescp --fork``; then the
listener's RSS while it receives ``--rss-images`` distinct images. Each round measures
every receiver once, back to back (a fresh qcnode each time), plus the disk alone
writing and flushing each image in turn (:func:`flush_floor`), so a round's ratio
compares runs under the same machine load; the medians over the rounds are printed at
the end, leaving out rounds during which the hypervisor stole more than
:data:`MAX_STEAL` of the CPUs.

Each run is timed from the moment every sender is connected (the receiver is stopped
with SIGSTOP while the storescu processes start, read their files and connect, then
continued; :func:`send_connected`) to the last sender's exit, and also from the first
sender's launch. A storescu costs ~30 ms of CPU before it connects (DCMTK loads its
data dictionary): 20 of them take ~0.3 s of a 500-image run on 2 cores, the same for
every receiver, time none of them can win back.

Every receiver is measured in its steady state, as a modality meets it: after it
started, it receives a 10-image warm-up series (its own UIDs), and the clock starts
once it and its child processes are idle: less than a fifth of a core used over half a
second (an idle qcnode tree polls for ~4 % of a core: the completion monitor and the
embedded workers' broker). A fresh ``qcnode serve`` spends its first seconds starting
two Celery worker processes, which import for several seconds of CPU; timing a sender
against that measured start-up on a 2-core machine, not ingest.

``--tls``: each round instead measures what DICOM over TLS costs (PS3.15 B.12,
``storescu +tls`` with a client certificate, both sides verifying, a test CA made with
``cryptography``): DCMTK storescp plain and with ``+tls``, qcnode plain and on its
TLS port with one sender, and on its TLS port with 20 senders (:func:`tls_round`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.ledger import Ledger, SeriesState  # noqa: E402
from tests.support.dcmtk import write_ct_series  # noqa: E402
from tests.support.net import free_port, wait_for, wait_port  # noqa: E402
from tests.support.node import default_sections, start_node, write_config  # noqa: E402
from tests.support.pki import issue, make_ca  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
#: Series states in which the pipeline has nothing more to do.
FINAL = {SeriesState.DELIVERED, SeriesState.FAILED, SeriesState.IGNORED}


@dataclass(frozen=True)
class Pki:
    """A CA, the receivers' certificate and the senders' (``--tls``)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def storescu(self) -> tuple[str, ...]:
        """storescu's options to send over TLS with the client certificate."""
        return ("+tls", str(self.client_key), str(self.client_cert), "+cf", str(self.ca))


def make_pki(out: Path) -> Pki:
    ca = make_ca(out, "bench")
    server = issue(ca, out, "server", common_name="localhost", ip=("127.0.0.1",))
    client = issue(ca, out, "client", common_name="bench-modality")
    return Pki(ca.cert, server.cert, server.key, client.cert, client.key)


def _senders(port: int, groups: list[list[Path]], aec: str,
             options: tuple[str, ...] = ()) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(["/usr/bin/storescu", "-aet", f"BENCH{i}" if len(groups) > 1 else
                          "BENCH", "-aec", aec, *options, "127.0.0.1", str(port),
                          *map(str, g)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, g in enumerate(groups)
    ]


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError("a storescu failed")


def send(port: int, files: list[Path], aec: str, aet: str = "BENCH",
         options: tuple[str, ...] = ()) -> float:
    """Seconds storescu takes to send ``files`` in one association."""
    start = time.perf_counter()
    subprocess.run(
        ["/usr/bin/storescu", "-aet", aet, "-aec", aec, *options, "127.0.0.1", str(port),
         *map(str, files)], env=ENV, check=True, capture_output=True,
    )
    return time.perf_counter() - start


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port``
    (``rx_queue`` of its LISTEN row in ``/proc/net/tcp``)."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                waiting += int(fields[4].split(":")[1], 16)
    return waiting


def send_connected(port: int, pid: int, groups: list[list[Path]], aec: str,
                   options: tuple[str, ...] = ()) -> Timing:
    """The receiver's own time: ``pid`` (the process that accepts) is stopped
    (SIGSTOP) while the storescu processes start, read their files and connect; the
    clock starts when every connection waits in the accept queue and the receiver is
    continued, and stops when the last storescu exited. A storescu process costs
    ~30 ms of CPU before it connects (DCMTK loads its data dictionary); 20 of them on
    this 2-core machine take ~0.3 s of the wall time of a 500-image run, time no
    receiver can win back. Also returns the time from the first process start."""
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.perf_counter()
        procs = _senders(port, groups, aec, options)
        wait_for(lambda: accept_queue(port) >= len(groups), timeout=60, interval=0.005,
                 what="every storescu connected")
    finally:
        os.kill(pid, signal.SIGCONT)
    start = time.perf_counter()
    _wait_all(procs)
    end = time.perf_counter()
    return Timing(end - start, end - started)


@dataclass(frozen=True)
class Timing:
    connected: float  # from every sender connected (receiver continued) to the last exit
    launched: float  # from the first sender's start to the last exit


@contextmanager
def qcnode(tmp: Path, *, store_only: bool = False,
           tls: Pki | None = None) -> Iterator[tuple[int, int, str]]:
    """A ``qcnode serve``; ``store_only``: one rule that stores and ignores every series
    (no assessment runs in the process, so its RSS is the receiving side's); ``tls``:
    the port yielded is its TLS port (client certificates required)."""
    tmp.mkdir(parents=True, exist_ok=True)
    home = tmp / "qc"
    sections = default_sections(home, free_port())
    sections["logging"] = {"level": "WARNING", "json": "always"}
    sections["spool"] = {"min_free_bytes": 0, "min_free_percent": 0.0}  # journal: defaults
    tables = {"rules": [{"name": "keep", "action": "store"}]} if store_only else {}
    tls_port = free_port()
    if tls is not None:
        sections["node"]["tls_port"] = tls_port
        sections["node.tls"] = {"cert_file": tls.server_cert, "key_file": tls.server_key,
                                "ca_file": tls.ca, "require_client_cert": True}
    config = write_config(tmp / "qcnode.toml", sections, tables)
    node = start_node(config, home, tmp / "qcnode.log")
    try:
        yield tls_port if tls is not None else node.port, node.proc.pid, node.ledger_url
    finally:
        node.stop()


@contextmanager
def storescp(tmp: Path, *, fork: bool = False,
             tls: Pki | None = None) -> Iterator[tuple[int, int]]:
    """DCMTK storescp; ``fork``: a child process per association (``--fork``), so that
    concurrent senders are served concurrently; ``tls``: over TLS only, the sender's
    certificate required (``+tls … -rc``)."""
    port = free_port()
    out = tmp / ("storescp-fork" if fork else "storescp") / ("tls" if tls else "")
    out.mkdir(parents=True)
    options = ("+tls", str(tls.server_key), str(tls.server_cert), "+cf", str(tls.ca),
               "-rc") if tls is not None else ()
    proc = subprocess.Popen(["/usr/bin/storescp", *(["--fork"] if fork else []), *options,
                             "-od",
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


def report(name: str, count: int, size: int, timing: Timing) -> tuple[float, float]:
    """Print and return the rates from every sender connected and from their launch."""
    rate, launched = count / timing.connected, count / timing.launched
    print(f"{name:<28} {count:>5} images {timing.connected:6.2f} s {rate:7.1f} img/s "
          f"{size / timing.connected / 1e6:7.1f} MB/s | from launch {timing.launched:6.2f} s "
          f"{launched:7.1f} img/s", flush=True)
    return rate, launched


def cpu_ticks() -> list[int]:
    """The machine's CPU time by state (``/proc/stat``: user … steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


STEAL = 7  # index of "steal" in cpu_ticks(): time the hypervisor gave our vCPUs to others
#: A round in which the hypervisor took more than this share of the CPUs during a
#: timed run is left out of the medians (the VM here goes through phases of 20–50 %
#: steal; a run then takes up to 4× as long, whatever the receiver).
MAX_STEAL = 0.05


def measure(name: str, files: list[Path], runner: Callable[[], Timing],
            steal: list[float]) -> tuple[float, float]:
    """Run ``runner`` from a clean page cache state: the previous receiver's dirty
    pages (hundreds of MB) would otherwise be written back during this run and slow
    whichever receiver comes later in the round (seen: storescp 1,090 → 494 img/s).
    Appends the share of CPU time stolen by the hypervisor meanwhile to ``steal``."""
    size = sum(f.stat().st_size for f in files)
    os.sync()
    before = cpu_ticks()
    timing = runner()
    delta = [b - a for a, b in zip(before, cpu_ticks(), strict=True)]
    steal.append(delta[STEAL] / max(1, sum(delta)))
    if steal[-1] > MAX_STEAL:
        print(f"{'':<28} hypervisor steal {steal[-1]:.0%} during this run", flush=True)
    return report(name, len(files), size, timing)


def warm_up(port: int, pid: int, warm: list[Path], aec: str,
            ledger: Ledger | None = None, options: tuple[str, ...] = ()) -> None:
    """Send the warm-up series, wait until it is applied (qcnode) and all is idle."""
    send(port, warm, aec, options=options)
    if ledger is not None:  # qcnode: received, completed, assessed, reported
        wait_for(lambda: ledger.open_associations() == 0, timeout=60, interval=0.01,
                 what="the warm-up series applied")
        wait_for(lambda: not any(n for state, n in ledger.series_counts().items()
                                 if state not in FINAL), timeout=180, interval=0.1,
                 what="the warm-up series through the pipeline")
    settle(pid)


def _all_applied(ledger: Ledger) -> bool:
    return ledger.open_associations() == 0


def flush_floor(directory: Path, files: list[Path]) -> float:
    """Images/s of the disk alone when each image must be on it before the next one
    starts: every file's bytes written (``pwrite``) into a pre-written file and
    flushed (``fdatasync``), one after the other — the device's part of what a
    receiver that answers a C-STORE only once the image is durable pays per image
    with one sender (no network, no sender, no parsing). storescp writes its files
    to the page cache and flushes nothing while the sender waits."""
    data = [f.read_bytes() for f in files]
    span = max(len(d) for d in data) * 16
    path = directory / "flush-floor.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(span))  # written in full: a flush then commits no metadata
        os.fsync(fd)
        start = time.perf_counter()
        for i, blob in enumerate(data):
            os.pwrite(fd, blob, (i % 16) * (span // 16))
            os.fdatasync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return len(data) / elapsed


def one_round(tmp: Path, series: list[Path], warm: list[Path]) -> dict[str, float]:
    """storescp (1 sender), storescp --fork (20), Orthanc (1), qcnode (1 and 20), back to
    back; every run timed by :func:`send_connected`."""
    rates: dict[str, float] = {}
    steal: list[float] = []
    tmp.mkdir(parents=True)
    one, twenty = [series], [series[i::20] for i in range(20)]

    def record(key: str, name: str, port: int, pid: int, groups: list[list[Path]],
               aec: str) -> None:
        rates[key], rates[key + " launched"] = measure(
            name, series, lambda: send_connected(port, pid, groups, aec), steal)

    with storescp(tmp) as (port, pid):
        warm_up(port, pid, warm, "STORESCP")
        record("storescp", "DCMTK storescp", port, pid, one, "STORESCP")
    with storescp(tmp, fork=True) as (port, pid):
        warm_up(port, pid, warm, "STORESCP")
        record("storescp 20", "DCMTK storescp --fork (20)", port, pid, twenty, "STORESCP")
    with orthanc(tmp) as (port, pid):
        warm_up(port, pid, warm, "ORTHANC")
        record("orthanc", "Orthanc", port, pid, one, "ORTHANC")
    os.sync()
    rates["flush floor"] = flush_floor(tmp, series)
    print(f"{'disk: write + fdatasync each':<28} {len(series):>5} images "
          f"{rates['flush floor']:7.1f} img/s (the flush per image alone)", flush=True)
    for key, groups in (("qcnode 1", one), ("qcnode 20", twenty)):
        with qcnode(tmp / key.replace(" ", "")) as (port, pid, url), Ledger(url) as ledger:
            warm_up(port, pid, warm, "QCNODE", ledger)
            before = cpu_seconds(pid)
            start = time.perf_counter()
            name = f"qcnode ({len(groups)} sender{'s' if len(groups) > 1 else ''})"
            record(key, name, port, pid, groups, "QCNODE")
            wait_for(partial(_all_applied, ledger), timeout=120, interval=0.01,
                     what="every image applied to the spool and the ledger")
            applied = time.perf_counter() - start
            cpu_ms = (cpu_seconds(pid) - before) / len(series) * 1000
            print(f"{'':<28} until every image is in the spool and the ledger "
                  f"(from launch): {len(series) / applied:.1f} img/s; listener CPU "
                  f"{cpu_ms:.2f} ms/image (all of it, applier included)", flush=True)
    print(f"ratio qcnode / storescp: {rates['qcnode 1'] / rates['storescp']:.2f} (1 sender); "
          f"qcnode 20 senders / 1 sender: {rates['qcnode 20'] / rates['qcnode 1']:.2f} "
          f"(from launch {rates['qcnode 20 launched'] / rates['qcnode 1 launched']:.2f}); "
          f"20 senders, qcnode / storescp --fork: "
          f"{rates['qcnode 20'] / rates['storescp 20']:.2f}", flush=True)
    rates["steal"] = max(steal)
    return rates


def tls_round(tmp: Path, series: list[Path], warm: list[Path], pki: Pki) -> dict[str, float]:
    """``--tls``: storescp plain and over TLS, qcnode plain, over TLS, over TLS with 20
    senders, back to back; every run timed by :func:`send_connected` (the TLS
    handshakes fall inside the timed part: the receiver is stopped while they start)."""
    rates: dict[str, float] = {}
    steal: list[float] = []
    tmp.mkdir(parents=True)
    one, twenty = [series], [series[i::20] for i in range(20)]
    tls = pki.storescu()

    def record(key: str, name: str, port: int, pid: int, groups: list[list[Path]],
               aec: str, options: tuple[str, ...]) -> None:
        rates[key], rates[key + " launched"] = measure(
            name, series, lambda: send_connected(port, pid, groups, aec, options), steal)

    for key, options in (("storescp", ()), ("storescp tls", tls)):
        with storescp(tmp, tls=pki if options else None) as (port, pid):
            warm_up(port, pid, warm, "STORESCP", options=options)
            record(key, f"DCMTK storescp{' +tls' if options else ''}", port, pid, one,
                   "STORESCP", options)
    for key, groups, options in (("qcnode 1", one, ()), ("qcnode tls 1", one, tls),
                                 ("qcnode tls 20", twenty, tls)):
        with qcnode(tmp / key.replace(" ", ""), tls=pki if options else None) as (
                port, pid, url), Ledger(url) as ledger:
            warm_up(port, pid, warm, "QCNODE", ledger, options)
            before = cpu_seconds(pid)
            record(key, f"qcnode{' TLS' if options else ''} ({len(groups)} sender"
                   f"{'s' if len(groups) > 1 else ''})", port, pid, groups, "QCNODE", options)
            print(f"{'':<28} listener CPU {(cpu_seconds(pid) - before) / len(series) * 1000:.2f}"
                  " ms/image", flush=True)
    print(f"ratio TLS / plain: qcnode {rates['qcnode tls 1'] / rates['qcnode 1']:.2f}, "
          f"storescp {rates['storescp tls'] / rates['storescp']:.2f}; TLS, qcnode / storescp "
          f"{rates['qcnode tls 1'] / rates['storescp tls']:.2f}; qcnode TLS 20 senders / 1: "
          f"{rates['qcnode tls 20'] / rates['qcnode tls 1']:.2f}", flush=True)
    rates["steal"] = max(steal)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-images", type=int, default=2000)
    parser.add_argument("--tls", action="store_true",
                        help="measure DICOM over TLS instead (tls_round); no RSS run")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qcnode-bench-"))
    try:
        series = write_ct_series(tmp / "series", args.images, size=512)
        warm = write_ct_series(tmp / "warm", 10, size=512)
        print(f"series: {len(series)} × 512×512 CT, "
              f"{sum(f.stat().st_size for f in series) / 1e6:.0f} MB; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        rounds = []
        pki = make_pki(tmp / "pki") if args.tls else None
        for i in range(args.rounds):
            print(f"round {i + 1}", flush=True)
            rounds.append(one_round(tmp / f"round{i}", series, warm) if pki is None
                          else tls_round(tmp / f"round{i}", series, warm, pki))
            shutil.rmtree(tmp / f"round{i}")  # 2 GB a round: do not fill the disk
        clean = [r for r in rounds if r["steal"] <= MAX_STEAL]
        if clean and len(clean) < len(rounds):
            print(f"{len(rounds) - len(clean)} of {len(rounds)} rounds left out: hypervisor "
                  f"steal above {MAX_STEAL:.0%} during a run", flush=True)
        rounds = clean or rounds
        if rounds:  # --rounds 0: the RSS run only
            print_medians(rounds)
        if args.rss_images and not args.tls:
            rss_run(tmp, args.rss_images, store_only=True)
            rss_run(tmp, args.rss_images, store_only=False)
    except BaseException:
        print(f"failed: logs kept in {tmp}", flush=True)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def print_medians(rounds: list[dict[str, float]]) -> None:
    """Each rate's median over the rounds, and the medians of the rounds' ratios."""
    print(f"medians over {len(rounds)} rounds (load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; steal at most "
          f"{max(r['steal'] for r in rounds):.0%}):", flush=True)
    for name in [n for n in rounds[0] if n != "steal"]:
        print(f"  {name:<20} {statistics.median(r[name] for r in rounds):7.1f} img/s",
              flush=True)
    if "qcnode tls 1" in rounds[0]:
        pairs = [("qcnode tls 1", "qcnode 1"), ("storescp tls", "storescp"),
                 ("qcnode tls 1", "storescp tls"), ("qcnode tls 20", "qcnode tls 1")]
        for name, ref in pairs:
            ratio = statistics.median(r[name] / r[ref] for r in rounds)
            print(f"  ratio {name} / {ref} (median of rounds): {ratio:.2f}", flush=True)
        return
    for name, ref in (("qcnode 1", "storescp"), ("qcnode 20", "qcnode 1"),
                      ("qcnode 20 launched", "qcnode 1 launched"),
                      ("qcnode 20", "storescp 20"), ("storescp 20", "storescp"),
                      ("storescp", "flush floor"), ("qcnode 1", "flush floor")):
        ratio = statistics.median(r[name] / r[ref] for r in rounds)
        print(f"  ratio {name} / {ref} (median of rounds): {ratio:.2f}", flush=True)


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
