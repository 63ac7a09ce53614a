"""End-to-end benchmark: last C-STORE response → SR stored in Orthanc, on embedded defaults.

Run: ``.venv/bin/python bench/e2e.py [--slices 300] [--quiet 2.0] [--series 20]
[--throughput-slices 60] [--runs 3]`` (``--series 0``: no throughput part).

What it does, all with real processes on loopback:

1. ``qcnode synth`` writes 30 slices of 512×512; they are tiled into a 300-slice series
   (new SOP Instance UIDs and positions every 30 slices): the pixel content repeats, the
   sizes and the pipeline's work (300 headers, 48 screened decodes, K = 8 assessed) are
   those of a real 300-slice series.
2. A real Orthanc and ``qcnode serve`` (SQLite ledger, embedded SQLite broker, embedded
   workers, physics engine, ``quiet_seconds`` = ``--quiet``) start in a temp directory.
3. A warm-up series goes through first (worker imports, first SR build).
4. Latency: the series is sent with DCMTK storescu (one association, TCP_NODELAY); the
   clock starts when storescu exits (within a release of the last C-STORE response:
   a few ms) and stops when Orthanc's REST API lists
   the SR (polled every 10 ms). The parts come from the node's JSON log events and the
   ledger: quiet period (last instance → series closed), preparation (closed → task
   queued), broker hop to ``gpu``, assessment, hop to ``io``, SR build, delivery.
4b. Latency with MPPS: the same, but right after storescu exits a pynetdicom SCU
   (the modality) sends the step's N-CREATE and N-SET COMPLETED listing every image
   to the node's MPPS SCP (``[mpps]``); the series closes without the quiet period
   (trigger ``mpps_completed``). ``mpps_s`` is the time the two N-messages took.
5. Throughput: ``--series`` series of ``--throughput-slices`` slices sent back to back
   (one association each); series/min from the first C-STORE to the last SR in
   Orthanc, and the listener's ingest rate (images/s) while the pipeline works,
   against the rate for the idle node in step 4.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.mpps import complete_step  # noqa: E402
from tests.support.net import free_port, wait_for  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402

NODE_AE = "QCNODE"
EXPLICIT_LE = UID("1.2.840.10008.1.2.1")
PIXEL_DATA = 0x7FE00010
STORESCU = "/usr/bin/storescu"
CONFIG = """\
[node]
ae_title = "{ae}"
port = {port}
home = "{home}"
[completion]
quiet_seconds = {quiet}
poll_seconds = 0.05
[web]
port = 0
[logging]
json = "always"
[mpps]
enabled = true
port = {mpps_port}
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs_port}
confirm = "find"
"""


def load_base(source: Sequence[Path]) -> list[tuple[pydicom.Dataset, bytes]]:
    """The synth slices as (header without pixels, pixel bytes)."""
    return [(pydicom.dcmread(p, stop_before_pixels=True), pydicom.dcmread(p).PixelData)
            for p in sorted(source)]


def make_series(base: list[tuple[pydicom.Dataset, bytes]],
                slices: int) -> list[pydicom.Dataset]:
    """``slices`` datasets tiled from ``base``, with fresh study/series/instance UIDs.

    Headers are deep copies; the pixel bytes (immutable) are shared between copies.
    """
    study, series = generate_uid(), generate_uid()
    thickness = float(base[0][0].get("SliceThickness", 1.0) or 1.0)
    result = []
    for i in range(slices):
        header, pixels = base[i % len(base)]
        ds = copy.deepcopy(header)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        pos = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], i * thickness]
        ds.SliceLocation = i * thickness
        ds.add_new(PIXEL_DATA, "OW", pixels)
        result.append(ds)
    return result


def write_series(datasets: Sequence[pydicom.Dataset], folder: Path) -> Path:
    """Write ``datasets`` as PS3.10 files into ``folder`` (for storescu)."""
    folder.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
        ds.save_as(folder / f"IM{i:04d}.dcm", enforce_file_format=True)
    return folder


def send(folder: Path, port: int) -> tuple[float, float]:
    """DCMTK storescu, one association; (start, end) — end is within a release of the
    last C-STORE response."""
    first = time.time()
    run = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", NODE_AE, "+sd", "127.0.0.1",
                          str(port), str(folder)], capture_output=True, text=True,
                         env={**os.environ, "TCP_NODELAY": "1"}, check=False, timeout=600)
    last = time.time()
    if run.returncode != 0:
        raise RuntimeError(f"storescu failed: {run.stderr[-500:]}")
    return first, last


def events(log: Path) -> list[dict[str, Any]]:
    """The node's JSON log events (embedded workers share its stdout)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            event["t"] = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            found.append(event)
    return found


def first_event(evs: list[dict[str, Any]], name: str, after: float,
                **match: Any) -> dict[str, Any]:
    for e in evs:
        if e["event"].startswith(name) and e["t"] >= after and \
                all(e.get(k) == v for k, v in match.items()):
            return e
    raise LookupError(f"no {name} event after {after}")


class Bench:
    """Orthanc + ``qcnode serve`` in a temp directory."""

    def __init__(self, work: Path, quiet: float) -> None:
        self.work = work
        self.port = free_port()
        self.mpps_port = free_port()
        self.pacs = Orthanc(work / "orthanc", {NODE_AE: self.port})
        self.home = work / "home"
        self.home.mkdir(parents=True)
        self.config = self.home / "qcnode.toml"
        self.config.write_text(CONFIG.format(ae=NODE_AE, port=self.port, home=self.home,
                                             quiet=quiet, pacs_port=self.pacs.dicom_port,
                                             mpps_port=self.mpps_port))
        self.log = self.home / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Bench:
        self.pacs.start()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(lambda: "listening on" in self.log.read_text(errors="replace"),
                 timeout=120, what="qcnode serve")
        wait_for(lambda: self.log.read_text(errors="replace").count(" ready.") >= 2,
                 timeout=180, what="embedded workers ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=120)
        self.pacs.stop()

    def sr_count(self) -> int:
        return len(self.pacs.find_modality("SR"))

    def wait_srs(self, n: int, timeout: float = 600.0) -> float:
        """Poll Orthanc until it holds ``n`` SRs; the time they were seen."""
        wait_for(lambda: self.sr_count() >= n, timeout=timeout, interval=0.01,
                 what=f"{n} SRs in Orthanc")
        return time.time()


def latency(bench: Bench, series: list[pydicom.Dataset], folder: Path,
            quiet: float, *, mpps: bool = False) -> dict[str, Any]:
    """Last image's Success → SR in Orthanc; with ``mpps``, MPPS COMPLETED is sent
    right after the last image."""
    before = bench.sr_count()
    first, last = send(write_series(series, folder), bench.port)
    uid = str(series[0].SeriesInstanceUID)
    if mpps:
        complete_step(bench.mpps_port, {uid: [str(ds.SOPInstanceUID) for ds in series]})
    mpps_done = time.time()
    seen = bench.wait_srs(before + 1)
    wait_for(lambda: any(e["event"] == "delivered" and e.get("series_uid") == uid
                         for e in events(bench.log)), timeout=60, what="delivered event")
    evs = events(bench.log)
    closed = first_event(evs, "series.closed", first, series_uid=uid)
    queued = first_event(evs, "job_queued", first, series_uid=uid)
    job = queued["job_id"]
    got_assess = first_event(evs, f"Task qcnode.assess[{queued['task_id']}]", queued["t"])
    assessed = first_event(evs, "assessed", queued["t"], job_id=job)
    got_report = first_event(evs, "Task qcnode.report", assessed["t"])
    built = first_event(evs, "sr_built", assessed["t"], job_id=job)
    sent = first_event(evs, "sent", built["t"], job_id=job)
    return {
        "trigger": closed["trigger"], "images": len(series),
        "ingest_images_per_s": len(series) / (last - first),
        "total_s": seen - last, "quiet_configured_s": quiet,
        "mpps_s": mpps_done - last if mpps else 0.0,
        "quiet_s": closed["t"] - last, "prepare_s": queued["prepare_seconds"],
        "dispatch_s": queued["t"] - closed["t"],
        "hop_gpu_s": got_assess["t"] - queued["t"], "assess_s": assessed["seconds"],
        "assess_task_s": assessed["t"] - got_assess["t"],
        "hop_io_s": got_report["t"] - assessed["t"], "sr_build_s": built["seconds"],
        "deliver_s": sent["seconds"], "report_task_s": sent["t"] - got_report["t"],
        "seen_in_orthanc_after_send_s": seen - sent["t"],
    }


def throughput(bench: Bench, folders: list[Path], images: int) -> dict[str, float]:
    before = bench.sr_count()
    windows = [send(folder, bench.port) for folder in folders]
    done = bench.wait_srs(before + len(folders))
    start, end = windows[0][0], windows[-1][1]
    return {"series": len(folders), "images": images,
            "series_per_min": len(folders) / ((done - start) / 60),
            "ingest_images_per_s_while_busy": images / (end - start),
            "send_s": end - start, "last_sr_after_last_image_s": done - end}


def _median(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "trigger"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--throughput-slices", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3, help="latency runs (median shown)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything (logs, ledger, Orthanc) here instead of a temp dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qcnode-bench-e2e-") as tmp:
        work = args.workdir or Path(tmp)
        subprocess.run([sys.executable, "-m", "node.cli", "synth", str(work / "synth"),
                        "--slices", "30", "--size", "512"], check=True, cwd=ROOT,
                       capture_output=True)
        source = load_base(sorted((work / "synth").rglob("*.dcm")))
        with Bench(work, args.quiet) as bench:
            send(write_series(make_series(source, 30), work / "warm"), bench.port)
            bench.wait_srs(1)
            runs = [latency(bench, make_series(source, args.slices), work / f"s{i}", args.quiet)
                    for i in range(args.runs)]
            median = _median(runs)
            mpps_runs = [latency(bench, make_series(source, args.slices), work / f"m{i}",
                                 args.quiet, mpps=True) for i in range(args.runs)]
            folders = [write_series(make_series(source, args.throughput_slices),
                                    work / f"t{i}") for i in range(args.series)]
            rate: dict[str, Any] = {}
            try:
                if folders:
                    rate = throughput(bench, folders, args.series * args.throughput_slices)
            except RuntimeError as exc:  # report what was measured, and the failure
                rate = {"error": str(exc)}
    print(json.dumps({"latency_runs": runs, "latency_median": median,
                      "latency_mpps_runs": mpps_runs, "latency_mpps_median": _median(mpps_runs),
                      "throughput": rate}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
