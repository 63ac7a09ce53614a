"""The pipeline with real peers: ledger → dispatcher → real Celery worker → real Orthanc.

The series is recorded in the ledger the way the listener records it (files in the
spool, one ``record_instance`` per file, ``close_series``); a real ``qcnode worker``
process consumes the embedded SQLite-backed broker; the SR is fetched back from
Orthanc's REST API and parsed. No eager mode, no mocks.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.prepare import prepare_series
from inference.result import AssessmentResult
from node.config import Settings, load_settings
from node.ledger import DeliveryState, JobState, Ledger, SeriesState
from node.ledger.instances import InstanceRecord
from node.pipeline.app import queue_depths
from node.pipeline.dispatch import Dispatcher
from node.pipeline.payload import job_key
from node.pipeline.speculate import Speculator
from sr_writer import parse_sr
from sr_writer.uids import derive_uid
from tests.support.e2e import kill_tree, same_result
from tests.support.net import wait_for
from tests.support.orthanc import Orthanc, running_orthanc

NODE_AE = "QCNODE"
SR_TIMEOUT = 120.0


def write_ct_series(spool: Path, n: int = 12, size: int = 128, seed: int = 0) -> list[Path]:
    """A small synthetic CT series (water cylinder with noise) as PS3.10 files."""
    rng = np.random.default_rng(seed)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    body = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.4) ** 2
    paths = []
    for i in range(n):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, (size, size))
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.PatientSex = "Test^Pipeline", "PIPE1", "O"
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19700101", "20250101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i + 1
        ds.SeriesDescription, ds.Manufacturer = "ABDOMEN", "qcnode-test"
        ds.FrameOfReferenceUID = frame_of_ref
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(i * 2.5)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness, ds.PixelSpacing = 2.5, [0.8, 0.8]
        ds.KVP, ds.PositionReferenceIndicator = 120, ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 350
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        path = spool / series / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def record_instances(ledger: Ledger, spool: Path, paths: list[Path]) -> None:
    """Record files as the listener does (one ``record_instance`` per file)."""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        ledger.record_instance(InstanceRecord(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            series_instance_uid=ds.SeriesInstanceUID, study_instance_uid=ds.StudyInstanceUID,
            modality=ds.Modality, series_description=ds.SeriesDescription,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            relpath=str(path.relative_to(spool)), size=len(data),
            sha256=hashlib.sha256(data).hexdigest(), calling_ae="SCANNER", assoc_id="a1",
            action="assess", rule="ct",
        ))


def record_series(ledger: Ledger, spool: Path, paths: list[Path]) -> str:
    """Record files as the listener does, then close the series (trigger ``quiet``)."""
    record_instances(ledger, spool, paths)
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert ledger.close_series(uid, 1, "quiet")
    return uid


def write_config(home: Path, pacs_port: int, *, extra: str = "") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "qcnode.toml"
    cfg.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nhome = "{home}"\n\n'
        f'[broker]\nqueue_prefix = "t{uuid.uuid4().hex[:8]}."\n\n'
        "[delivery]\nmax_attempts = 3\nbackoff_initial_seconds = 0.5\n"
        "backoff_max_seconds = 2.0\n\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f'port = {pacs_port}\nconfirm = "find"\ntimeout = 5.0\n{extra}'
    )
    return cfg


class Site:
    """A node home with its settings, ledger, dispatcher and a real worker process."""

    def __init__(self, home: Path, pacs: Orthanc, extra: str = "") -> None:
        self.home = home
        self.pacs = pacs
        self.config = write_config(home, pacs.dicom_port, extra=extra)
        self.settings: Settings = load_settings(self.config)
        self.ledger = Ledger.open(self.settings.ledger_url)
        self.worker: subprocess.Popen[bytes] | None = None
        self.log = home / "worker.log"

    def start_worker(self) -> None:
        with self.log.open("ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "worker", "--queues", "gpu,io",
                 "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.ledger.close()

    def series(self, n: int = 12, seed: int = 0) -> str:
        spool = self.settings.spool_dir
        return record_series(self.ledger, spool, write_ct_series(spool, n=n, seed=seed))

    def worker_log(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


@pytest.fixture()
def site(tmp_path: Path, pacs: Orthanc) -> Iterator[Site]:
    s = Site(tmp_path / "home", pacs)
    s.start_worker()
    try:
        yield s
    finally:
        s.stop()


def delivered(ledger: Ledger, uid: str) -> bool:
    """True once delivered; fails at once when the series was dead-lettered."""
    info = ledger.series_info(uid)
    if info.state == SeriesState.FAILED:
        pytest.fail(f"series failed: {info.last_error}")
    return info.state == SeriesState.DELIVERED


def fetch_sr(pacs: Orthanc) -> pydicom.Dataset:
    ids = pacs.find_modality("SR")
    assert len(ids) == 1, f"expected one SR in Orthanc, found {len(ids)}"
    return pydicom.dcmread(io.BytesIO(pacs.instance_file(ids[0])))


def test_series_to_sr_in_orthanc(site: Site) -> None:
    uid = site.series()
    with Dispatcher(site.settings, site.ledger) as dispatcher:
        job = dispatcher.dispatch(uid)
    assert job is not None
    wait_for(lambda: delivered(site.ledger, uid),
             timeout=SR_TIMEOUT, what=f"series delivered; worker log:\n{site.worker_log()}")
    sr = fetch_sr(site.pacs)
    recorded = site.ledger.get_job(job.id)
    assert recorded.state == JobState.DONE
    assert sr.SOPInstanceUID == recorded.sr_uid
    assert same_result(parse_sr(sr), AssessmentResult.from_json(recorded.result_json or ""))
    (delivery,) = site.ledger.deliveries_of(job.id)
    assert delivery.state == DeliveryState.CONFIRMED
    assert delivery.confirmed_by == "find"
    # At-least-once delivery: the broker hands the same report message out again. The
    # worker runs it, finds the job done, and Orthanc still holds exactly one SR.
    def reports_run() -> int:
        return site.log.read_text(errors="replace").count("Task qcnode.report[")

    before = reports_run()
    paths = [site.settings.spool_dir / p for p in site.ledger.instance_relpaths(uid)]
    with Dispatcher(site.settings, site.ledger) as dispatcher:
        dispatcher._send_report(recorded, paths)
    wait_for(lambda: reports_run() >= before + 2, timeout=SR_TIMEOUT,
             what=f"the redelivered report task ran; worker log:\n{site.worker_log()}")
    assert len(site.pacs.find_modality("SR")) == 1
    assert site.ledger.get_job(job.id).state == JobState.DONE


def test_dispatch_replaces_a_stale_broker_connection(site: Site) -> None:
    """Guaranteed: a broker connection whose channel kombu has closed (what it does
    after a broker error; seen on the embedded broker while the workers started) does
    not dead-letter the series: the dispatcher sends on a new connection and the
    series is delivered."""
    uid = site.series()
    with Dispatcher(site.settings, site.ledger) as dispatcher:
        stale = dispatcher.app.connection_for_write()
        stale.transport.close_channel(stale.default_channel)  # channel.connection = None
        dispatcher._connection = stale
        job = dispatcher.dispatch(uid)
        assert job is not None
        assert dispatcher._connection is not stale
    wait_for(lambda: delivered(site.ledger, uid),
             timeout=SR_TIMEOUT, what=f"series delivered; worker log:\n{site.worker_log()}")


def predecessor_uids(ds: pydicom.Dataset) -> list[str]:
    """The SOP Instance UIDs in a document's Predecessor Documents Sequence (C.17.2)."""
    return [str(sop.ReferencedSOPInstanceUID)
            for study in ds.get("PredecessorDocumentsSequence", [])
            for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence]


def delivered_generation(ledger: Ledger, uid: str, generation: int) -> bool:
    """True once the series is delivered by a job of ``generation``."""
    return delivered(ledger, uid) and ledger.jobs_of_series(uid)[-1].generation == generation


def test_reassessment_supersedes_the_sr_and_the_text_sr(tmp_path: Path, pacs: Orthanc) -> None:
    """A late instance re-opens a delivered series: the new SR and Text SR name the old ones."""
    site = Site(tmp_path / "home", pacs, extra='companions = ["text_sr", "pdf"]')
    site.start_worker()
    try:
        spool = site.settings.spool_dir
        paths = write_ct_series(spool, n=12, seed=3)
        record_instances(site.ledger, spool, paths[:11])
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        for generation, late in ((1, []), (2, paths[11:])):
            record_instances(site.ledger, spool, late)
            assert site.ledger.close_series(uid, generation, "quiet")
            with Dispatcher(site.settings, site.ledger) as dispatcher:
                dispatcher.dispatch(uid)
            wait_for(partial(delivered_generation, site.ledger, uid, generation),
                     timeout=SR_TIMEOUT,
                     what=f"generation {generation} delivered:\n{site.worker_log()}")
        old, new = site.ledger.jobs_of_series(uid)
        assert (old.state, new.state) == (JobState.DONE, JobState.DONE)
        assert new.superseded_sr_uid == old.sr_uid
        reports = site.home / "reports"
        kept = [pydicom.dcmread(reports / j.report_path) for j in (old, new) if j.report_path]
        assert predecessor_uids(kept[1]) == [old.sr_uid]
        texts = {j.generation: pydicom.dcmread(
            reports / (j.report_path or "").rpartition("/")[0] /
            f"{derive_uid(job_key(uid, j.generation, j.engine_key), 'text-sr-instance')}.dcm")
            for j in (old, new)}
        assert predecessor_uids(texts[1]) == []
        assert predecessor_uids(texts[2]) == [str(texts[1].SOPInstanceUID)]
        assert len(pacs.find_modality("SR")) == 4  # two TID 1500 SRs, two Text SRs
        assert len(list((reports / str(kept[0].StudyInstanceUID)).iterdir())) == 6
    finally:
        site.stop()


def test_pacs_down_first_then_up(site: Site) -> None:
    site.pacs.stop()
    uid = site.series(seed=1)
    with Dispatcher(site.settings, site.ledger) as dispatcher:
        job = dispatcher.dispatch(uid)
    assert job is not None
    wait_for(lambda: any(d.state == DeliveryState.FAILED
                         for d in site.ledger.deliveries_of(job.id)),
             timeout=SR_TIMEOUT, what="a failed delivery attempt")
    # The SR was kept before the first attempt; the retries reuse that very file.
    relpath = site.ledger.get_job(job.id).report_path
    assert relpath is not None
    kept = site.home / "reports" / relpath
    first = kept.stat()
    site.pacs.start()
    wait_for(lambda: delivered(site.ledger, uid),
             timeout=SR_TIMEOUT, what=f"delivered after PACS is back:\n{site.worker_log()}")
    assert len(site.pacs.find_modality("SR")) == 1
    (delivery,) = site.ledger.deliveries_of(job.id)
    assert delivery.attempts >= 2
    again = kept.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]
    assert site.ledger.get_job(job.id).report_path == relpath


def test_sqlite_broker_does_not_redeliver_after_sigkill(tmp_path: Path, pacs: Orthanc) -> None:
    """A worker killed outright loses its message on the SQLite broker; the ledger recovers it.

    The embedded transport deletes a message when a worker fetches it and has no
    visibility timeout, so after SIGKILL of the worker (main and pool processes) the
    queue is empty while the ledger still says "assessing". Re-dispatching the ``gpu``
    stage from the ledger (what the node does when it replaces a dead worker) gets the
    series assessed again, and one SR arrives.
    """
    site = Site(tmp_path / "home", pacs, extra='\n[engine]\nslices = 40\n')
    site.start_worker()
    try:
        uid = record_series(site.ledger, site.settings.spool_dir,
                            write_ct_series(site.settings.spool_dir, n=40, size=256, seed=5))
        with Dispatcher(site.settings, site.ledger) as dispatcher:
            job = dispatcher.dispatch(uid)
        assert job is not None
        wait_for(lambda: site.ledger.series_info(uid).state == SeriesState.ASSESSING,
                 timeout=SR_TIMEOUT, interval=0.02, what=f"assessing\n{site.worker_log()}")
        assert site.worker is not None
        kill_tree(site.worker.pid)
        site.worker.wait(timeout=30)
        assert queue_depths(site.settings) == {"gpu": 0, "io": 0}, "the message is gone"
        assert site.ledger.get_job(job.id).state == JobState.ASSESSING
        site.start_worker()
        with Dispatcher(site.settings, site.ledger) as dispatcher:
            assert dispatcher.redispatch("gpu") == 1
        wait_for(lambda: delivered(site.ledger, uid), timeout=SR_TIMEOUT,
                 what=f"delivered after redispatch\n{site.worker_log()}")
        assert site.ledger.get_job(job.id).attempts == 2
        assert len(site.pacs.find_modality("SR")) == 1
    finally:
        site.stop()


def test_speculative_preparation_is_used_only_for_unchanged_files(tmp_path: Path) -> None:
    """A quiet, still open series is prepared ahead; a new instance invalidates it."""
    spool = tmp_path / "spool"
    paths = write_ct_series(spool, n=10, seed=7)
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}") as ledger:
        record_instances(ledger, spool, paths[:9])
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        with Speculator(ledger, spool, lambda p: prepare_series(p, k=4),
                        quiet_seconds=0.2) as speculator:
            first = speculator.key(uid)
            assert len(first) == 9
            wait_for(lambda: speculator.prepared_key(uid) == first, timeout=60,
                     what="speculative preparation of 9 instances")
            record_instances(ledger, spool, paths[9:])
            second = speculator.key(uid)
            wait_for(lambda: speculator.prepared_key(uid) == second, timeout=60,
                     what="preparation again after a new instance")
            assert speculator.take(uid, first) is None, "stale files must not be used"
            wait_for(lambda: speculator.prepared_key(uid) == second, timeout=60,
                     what="prepared again after the stale take")
            ready = speculator.take(uid, second)
    assert ready is not None
    prepared, payload = ready
    expected = prepare_series([spool / p for p in second], k=4)
    assert [s.sop_instance_uid for s in prepared.slices] == \
        [s.sop_instance_uid for s in expected.slices]
    assert payload == prepared.to_bytes()
