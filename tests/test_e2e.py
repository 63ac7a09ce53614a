"""End to end with real peers: ``qcnode synth`` → DCMTK storescu → ``qcnode serve`` → SR in Orthanc.

Every test runs the real processes (``qcnode serve`` with its embedded Celery workers on
the SQLite broker, or with Redis / RabbitMQ and separate ``qcnode worker`` processes), a
real Orthanc started on free ports, and fetches the SR back over Orthanc's REST API;
the parsed SR must equal the result the ledger recorded. No eager mode, no mocks.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from inference.result import AssessmentResult
from node.ledger import DeliveryState, JobState, SeriesState
from sr_writer import extract_pdf, parse_sr
from tests.support.dicom3tools import dciodvfy
from tests.support.e2e import NODE_AE, NodeSite, same_result, series_uid_of, storescu, synth_series
from tests.support.orthanc import Orthanc, running_orthanc

REDIS_URL = "redis://127.0.0.1:6379/11"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
TEXT_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic CT series (24 slices of 256²), shared by the tests of this module."""
    return synth_series(tmp_path_factory.mktemp("synth"), slices=24, size=256)


def reports_in(pacs: Orthanc) -> dict[str, list[pydicom.Dataset]]:
    """Every non-image object in the PACS (modalities SR and DOC), by SOP Class UID."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for orthanc_id in [*pacs.find_modality("SR"), *pacs.find_modality("DOC")]:
        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(orthanc_id)))
        found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def check_delivered(site: NodeSite, uid: str, timeout: float = 120.0) -> AssessmentResult:
    """The series' SR is in Orthanc once, and parses to the ledger's result."""
    site.wait_state(uid, SeriesState.DELIVERED, timeout=timeout)
    job = site.job(uid)
    assert job.state == JobState.DONE
    assert job.sr_uid is not None and job.result_json is not None
    recorded = AssessmentResult.from_json(job.result_json)
    parsed = parse_sr(site.sr_in_pacs(job.sr_uid))
    assert same_result(parsed, recorded), (parsed, recorded)
    assert parsed.series_instance_uid == uid
    assert len(reports_in(site.pacs)[COMPREHENSIVE_3D_SR]) == 1
    (delivery,) = site.ledger.deliveries_of(job.id)
    assert delivery.state == DeliveryState.CONFIRMED
    assert delivery.confirmed_by == "find"
    return recorded


def status_json(site: NodeSite) -> dict[str, Any]:
    """``qcnode status --json`` of the site."""
    run = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config",
                          str(site.config)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stderr
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def test_embedded_defaults_with_companions(tmp_path: Path, pacs: Orthanc,
                                           series_dir: Path) -> None:
    """Embedded broker and workers; the destination also asks for Text SR and PDF."""
    site = NodeSite(tmp_path / "home", pacs, companions='companions = ["text_sr", "pdf"]')
    try:
        site.start()
        storescu(series_dir, site.port)
        uid = series_uid_of(series_dir)
        recorded = check_delivered(site, uid)
        reports = reports_in(pacs)
        assert sorted(reports) == sorted([COMPREHENSIVE_3D_SR, TEXT_SR_CLASS, PDF_CLASS])
        (text_sr,) = reports[TEXT_SR_CLASS]
        (pdf,) = reports[PDF_CLASS]
        assert f"{recorded.score:.1f}" in text_sr.to_json()
        assert extract_pdf(pdf).startswith(b"%PDF")
        # Companions carry the job's time, like the SR: a rebuild is the same object.
        sr = reports[COMPREHENSIVE_3D_SR][0]
        assert text_sr.ContentDate == pdf.ContentDate == sr.ContentDate
        # Every object sent is also kept in <home>/reports/<Study UID>/.
        kept = site.home / "reports" / str(sr.StudyInstanceUID)
        assert sorted(p.name for p in kept.iterdir()) == sorted(
            f"{ds.SOPInstanceUID}.dcm" for ds in (sr, text_sr, pdf))
        assert pydicom.dcmread(kept / f"{pdf.SOPInstanceUID}.dcm").EncapsulatedDocument \
            == pdf.EncapsulatedDocument
        report = status_json(site)
        assert report["queues"] == {"gpu": 0, "io": 0}
        assert report["counts"]["delivered"] == 1
        assert report["failures"] == []
    finally:
        site.stop()


def test_embedded_defaults_without_destination_keeps_the_report(tmp_path: Path,
                                                                  series_dir: Path) -> None:
    """No destination (the ``make serve`` default): the SR is kept in ``<home>/reports``."""
    site = NodeSite(tmp_path / "home", None)
    try:
        site.start()
        storescu(series_dir, site.port)
        uid = series_uid_of(series_dir)
        site.wait_state(uid, SeriesState.DELIVERED)
        job = site.job(uid)
        assert job.state == JobState.DONE and job.report_path is not None
        assert site.ledger.deliveries_of(job.id) == []
        path = (site.home / "reports" / job.report_path).resolve()
        sr = pydicom.dcmread(path)
        assert str(sr.SOPInstanceUID) == job.sr_uid
        assert job.report_path == f"{sr.StudyInstanceUID}/{sr.SOPInstanceUID}.dcm"
        assert [p.name for p in path.parent.iterdir()] == [path.name], "temp file left"
        verdict = dciodvfy(sr, tmp_path)
        print(verdict.report())
        assert verdict.errors == (), verdict.output
        assert same_result(parse_sr(sr), AssessmentResult.from_json(job.result_json or ""))
        (entry,) = status_json(site)["series"]
        assert entry["report_path"] == str(path)
        assert entry["destinations"] == 0
        assert entry["note"] == f"no destinations; report kept at {path}"
    finally:
        site.stop()


@pytest.mark.parametrize("broker_url", [REDIS_URL, RABBIT_URL], ids=["redis", "rabbitmq"])
def test_external_broker_with_separate_workers(tmp_path: Path, pacs: Orthanc,
                                               series_dir: Path, broker_url: str) -> None:
    """A broker URL: the node runs listener only; ``qcnode worker`` per queue does the work."""
    site = NodeSite(tmp_path / "home", pacs, broker=f'url = "{broker_url}"')
    try:
        site.start()
        assert "worker_started" not in site.log(), "no embedded workers with a broker URL"
        site.start_worker("gpu")
        site.start_worker("io")
        storescu(series_dir, site.port)
        check_delivered(site, series_uid_of(series_dir))
        assert "qcnode.assess" in site.log("worker-gpu", 100_000)
        assert "qcnode.report" in site.log("worker-io", 100_000)
        assert status_json(site)["queues"] == {"gpu": 0, "io": 0}
    finally:
        site.stop()


def test_vlm_engine_on_tiny_model(tmp_path: Path, pacs: Orthanc, series_dir: Path,
                                  tiny_gemma_dir: Path) -> None:
    """The VLM engine's real code path (tiny random Gemma 3); job key = the engine's key."""
    from inference.vlm import VlmEngine

    engine = f'name = "vlm"\nmodel = "{tiny_gemma_dir}"\ndevice = "cpu"\nslices = 4'
    site = NodeSite(tmp_path / "home", pacs, engine=engine)
    try:
        site.start()
        storescu(series_dir, site.port)
        uid = series_uid_of(series_dir)
        recorded = check_delivered(site, uid, timeout=300.0)
        expected = VlmEngine(tiny_gemma_dir, device="cpu").info
        assert recorded.engine == expected
        assert site.job(uid).engine_key == expected.key
        assert expected.model_revision and expected.model_revision.startswith("sha256:")
    finally:
        site.stop()


def test_a_batching_gpu_worker_delivers_each_series_once(
    tmp_path: Path, pacs: Orthanc
) -> None:
    """``[engine] batch_series = 3``: the embedded gpu worker runs three task threads that
    share one engine call (inference.batcher); every job still moves through its own
    states and is assessed and delivered exactly once."""
    folders = [synth_series(tmp_path / f"s{i}", slices=8, size=128, seed=i) for i in range(3)]
    engine = 'name = "physics"\nbatch_series = 3\nbatch_wait_seconds = 5.0'
    site = NodeSite(tmp_path / "home", pacs, engine=engine, quiet=0.5)
    try:
        site.start()
        for folder in folders:
            storescu(folder, site.port)
        uids = [series_uid_of(folder) for folder in folders]
        for uid in uids:
            site.wait_state(uid, SeriesState.DELIVERED, timeout=120.0)
            job = site.job(uid)
            assert job.state == JobState.DONE and job.attempts == 1, job
        srs = reports_in(pacs)[COMPREHENSIVE_3D_SR]
        assert len(srs) == 3  # one SR per series, none twice
        batches = [json.loads(line) for line in site.log("serve", 10**7).splitlines()
                   if '"batch_assessed"' in line]
        assert batches and max(b["series"] for b in batches) >= 2, site.logs()
    finally:
        site.stop()
