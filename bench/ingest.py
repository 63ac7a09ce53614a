"""Ingest benchmark: DCMTK storescu → qcnode, DCMTK storescp and Orthanc, in one run.

Run ``.venv/bin/python bench/ingest.py [--images 500] [--rss-images 2000]``. It writes a
512×512 CT series with pydicom, sends it with ``/usr/bin/storescu`` (``TCP_NODELAY=1``)
to each receiver on 127.0.0.1 (free ports, temporary homes), and prints images/s and
MB/s for each and the ratio qcnode / storescp; then 20 concurrent storescu senders to
qcnode; then the listener's RSS while it receives ``--rss-images`` distinct images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from tests.support.dcmtk import write_ct_series  # noqa: E402
from tests.support.net import free_port, wait_port  # noqa: E402
from tests.support.node import default_sections, start_node, write_config  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


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
def qcnode(tmp: Path, processes: int = 1) -> Iterator[tuple[int, int]]:
    tmp.mkdir(parents=True, exist_ok=True)
    home = tmp / "qc"
    sections = default_sections(home, free_port())
    sections["logging"] = {"level": "WARNING", "json": "always"}
    sections["node"]["listener_processes"] = processes
    config = write_config(tmp / "qcnode.toml", sections)
    node = start_node(config, home, tmp / "qcnode.log")
    try:
        yield node.port, node.proc.pid
    finally:
        node.stop()


@contextmanager
def storescp(tmp: Path) -> Iterator[int]:
    port = free_port()
    out = tmp / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), "-aet", "STORESCP",
                             str(port)], env=ENV)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def orthanc(tmp: Path) -> Iterator[int]:
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
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def report(name: str, count: int, size: int, seconds: float) -> float:
    rate = count / seconds
    print(f"{name:<28} {count:>5} images {seconds:7.2f} s {rate:8.1f} img/s "
          f"{size / seconds / 1e6:8.1f} MB/s", flush=True)
    return rate


def measure(name: str, files: list[Path], runner: Callable[[], float]) -> float:
    size = sum(f.stat().st_size for f in files)
    return report(name, len(files), size, runner())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rss-images", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qcnode-bench-"))
    try:
        series = write_ct_series(tmp / "series", args.images, size=512)
        print(f"series: {len(series)} × 512×512 CT, "
              f"{sum(f.stat().st_size for f in series) / 1e6:.0f} MB", flush=True)
        with storescp(tmp) as port:
            base = measure("DCMTK storescp", series, lambda: send(port, series, "STORESCP"))
        with orthanc(tmp) as port:
            measure("Orthanc", series, lambda: send(port, series, "ORTHANC"))
        with qcnode(tmp / "a") as (port, _):
            ours = measure("qcnode (1 sender)", series, lambda: send(port, series, "QCNODE"))
        groups = [series[i::20] for i in range(20)]
        with qcnode(tmp / "b") as (port, _):
            measure("qcnode (20 senders)", series,
                    lambda: send_parallel(port, groups, "QCNODE"))
        print(f"ratio qcnode / storescp: {ours / base:.2f}", flush=True)
        rss_run(tmp, args.rss_images)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def rss_run(tmp: Path, count: int) -> None:
    """Peak RSS of the listener process while it receives ``count`` distinct images."""
    chunks = [write_ct_series(tmp / f"rss{i}", min(500, count - i * 500), size=512)
              for i in range((count + 499) // 500)]
    with qcnode(tmp / "c") as (port, pid):
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
        print(f"listener peak RSS over {sent[0]} images: {rss_kib(pid, 'VmHWM') / 1024:.1f} MiB",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
