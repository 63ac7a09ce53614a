"""The listener against real DCMTK peers, through ``qcnode serve`` as a subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.ledger import Ledger, SeriesState
from node.receive.dicomio import is_valid_uid
from node.store.spool import path_part
from tests.support.dcmtk import (
    PROPOSE_OPTION,
    SECRET_PATIENT_NAME,
    echoscu,
    storescu,
    storescu_popen,
    write_ct_series,
)
from tests.support.net import wait_for
from tests.support.node import REPO, RunningNode, running_node

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: Samples the sending peer itself cannot read (not a listener question).
STORESCU_CANNOT_READ = {
    # storescu 3.6.7: "missing SOP class (or instance) in file" (UN-encoded attributes)
    "explicit_VR-UN.dcm",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, dcmtk: Path) -> Iterator[RunningNode]:
    tmp = tmp_path_factory.mktemp("scp")
    tables = {"senders": [{"ae_title": "*", "host": "127.0.0.1"}]}
    with running_node(tmp, tables=tables) as running:
        yield running


@pytest.fixture(scope="module")
def ledger(node: RunningNode) -> Iterator[Ledger]:
    with Ledger(node.ledger_url) as led:
        yield led


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information group (PS3.10 §7.1)."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_end:]


def test_echo_and_store_series_closes_with_trigger(
    node: RunningNode, ledger: Ledger, tmp_path: Path
) -> None:
    assert echoscu(node.port).returncode == 0
    files = write_ct_series(tmp_path / "ct", 100)
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    # Closed: complete, or already further down the pipeline (queued, assessing, ...).
    info = wait_for(
        lambda: (i := ledger.series_info(series_uid)).state != SeriesState.RECEIVING and i,
        timeout=60, what="series closed",
    )
    assert info.instance_count == 100
    assert info.close_trigger == "quiet"
    relpaths = ledger.instance_relpaths(series_uid)
    assert len(relpaths) == 100
    for relpath in relpaths:
        assert (node.spool / relpath).stat().st_size > 64 * 64 * 2
    sent = {_dataset_bytes(f) for f in files}
    assert {_dataset_bytes(node.spool / r) for r in relpaths} == sent


def _compressed_ct_cr_samples() -> list[Path]:
    import data_store

    found = []
    roots = [PYDICOM_FILES, Path(data_store.__file__).parent / "data"]
    for path in sorted(p for root in roots for p in root.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        valid_uids = all(
            is_valid_uid(str(ds.get(k, ""))) for k in
            ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        )  # bad_sequence.dcm carries a hex digest as UID: refused by design
        if (ds.get("Modality") in ("CT", "CR") and "TransferSyntaxUID" in ds.file_meta
                and ds.file_meta.TransferSyntaxUID.is_compressed and valid_uids
                and path.name not in STORESCU_CANNOT_READ):
            found.append(path)
    return found


def _applied(ledger: Ledger) -> None:
    """Wait until every association's images were applied from the receive journal (a
    Success means durable in the journal; spool file and ledger row follow shortly)."""
    wait_for(lambda: ledger.open_associations() == 0, timeout=30,
             what="associations ended (their images applied)")


def test_compressed_samples_stored_unchanged(node: RunningNode, ledger: Ledger) -> None:
    samples = _compressed_ct_cr_samples()
    assert len(samples) >= 7, samples
    by_syntax: dict[str, list[Path]] = {}
    for sample in samples:
        ts = str(pydicom.dcmread(sample, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        by_syntax.setdefault(ts, []).append(sample)
    for ts, files in by_syntax.items():
        result = storescu(node.port, files, options=[PROPOSE_OPTION[ts]])
        assert result.returncode == 0, result.stdout + result.stderr
    _applied(ledger)
    for sample in samples:
        original = pydicom.dcmread(sample)
        uid = str(original.SOPInstanceUID)
        assert ledger.versions_of(uid), f"{sample.name} not recorded"
        candidates = [pydicom.dcmread(p) for p in node.spool.rglob(f"{uid}*.dcm")]
        assert any(_same_instance(original, c) for c in candidates), (
            f"{sample.name} not stored identically"
        )


def _same_instance(original: pydicom.Dataset, stored: pydicom.Dataset) -> bool:
    """Same transfer syntax, identical encoded pixel data, equal other elements.

    DCMTK's storescu drops group-length elements and may re-pad values when it sends,
    so the file bytes around the elements can differ from the sample file; what the
    node stores is exactly what arrived.
    """
    def strip(ds: pydicom.Dataset) -> pydicom.Dataset:
        copy = pydicom.Dataset(ds)
        for elem in list(copy):
            if elem.tag.element == 0 or elem.tag == 0x7FE00010:
                del copy[elem.tag]
        return copy

    return (
        original.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
        and original.PixelData == stored.PixelData
        and strip(original) == strip(stored)
    )


def test_truncated_pixel_data_refused_and_quarantined(
    node: RunningNode, tmp_path: Path
) -> None:
    bad = write_ct_series(tmp_path / "bad", 1, truncate_pixels=True)
    before = set((node.home / "quarantine").glob("*.reason"))
    result = storescu(node.port, bad)
    output = result.stdout + result.stderr  # DCMTK logs to stderr
    assert "Store Response (Error: CannotUnderstand)" in output, output
    wait_for(lambda: '"status": "0xC210"' in node.log_text(), timeout=10, what="status logged")
    reasons = set((node.home / "quarantine").glob("*.reason")) - before
    assert len(reasons) == 1
    assert "pixel data" in next(iter(reasons)).read_text()
    uid = str(pydicom.dcmread(bad[0]).SOPInstanceUID)
    assert not list(node.spool.rglob(f"{uid}*"))
    assert echoscu(node.port).returncode == 0  # still serving


def test_duplicate_same_bytes_once_different_bytes_new_version(
    node: RunningNode, ledger: Ledger, tmp_path: Path
) -> None:
    files = write_ct_series(tmp_path / "dup", 1)
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files).returncode == 0
    _applied(ledger)
    ds = pydicom.dcmread(files[0])
    uid = str(ds.SOPInstanceUID)
    assert len(ledger.versions_of(uid)) == 1
    ds.SeriesDescription = "changed"
    ds.save_as(files[0])
    assert storescu(node.port, files).returncode == 0
    _applied(ledger)
    assert [v for v, _ in ledger.versions_of(uid)] == [1, 2]
    assert len(list(node.spool.rglob(f"{uid}*.dcm"))) == 2


def test_twenty_concurrent_associations(node: RunningNode, ledger: Ledger, tmp_path: Path) -> None:
    series = [write_ct_series(tmp_path / f"s{i}", 10) for i in range(20)]
    procs = [storescu_popen(node.port, files, aet=f"MOD{i}") for i, files in enumerate(series)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    for files in series:
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        def recorded(u: str = uid) -> bool:
            return ledger.series_info(u).instance_count == 10

        wait_for(recorded, timeout=30, what="instances recorded")
        relpaths = ledger.instance_relpaths(uid)
        assert len(relpaths) == len(set(relpaths)) == 10
        assert len(list(node.spool.rglob(f"*/{uid}/*.dcm"))) == 10
    # One thread serves all 20 associations: each log line still carries the context of
    # its own (calling AE, association, series), never that of the one served before.
    expected = {f"MOD{i}": str(pydicom.dcmread(files[0]).SeriesInstanceUID)
                for i, files in enumerate(series)}
    lines = [json.loads(line) for line in node.log_text().splitlines()
             if line.startswith("{") and '"instance journaled"' in line]
    mine = [entry for entry in lines if entry.get("calling_ae") in expected]
    assert len(mine) == 200
    assert all(entry["series_uid"] == expected[entry["calling_ae"]] for entry in mine)
    associations: dict[str, set[str]] = {}
    for entry in mine:
        associations.setdefault(entry["calling_ae"], set()).add(entry["assoc_id"])
    assert all(len(ids) == 1 for ids in associations.values())
    assert len(set().union(*associations.values())) == 20


def test_idle_connections_do_not_lock_out_senders(node: RunningNode) -> None:
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(16)]
    try:
        assert echoscu(node.port).returncode == 0
        # The ACSE timeout (2 s in the test config) closes connections that never speak.
        idle[0].settimeout(20)
        assert idle[0].recv(1024) == b""  # closed by the node, not by the timeout here
    finally:
        for sock in idle:
            sock.close()


def test_no_patient_attribute_in_logs(node: RunningNode) -> None:
    # The series above all carry SECRET_PATIENT_NAME and PatientID SECRETID42.
    text = node.log_text()
    assert "instance journaled" in text  # DEBUG logging was on while they were received
    family = SECRET_PATIENT_NAME.split("^")[0]
    assert family not in text and "Secretname" not in text and "SECRETID42" not in text


def test_listener_does_not_import_torch() -> None:
    code = (
        "import sys, node.serve, node.receive.scp, node.store.spool, node.receive.dicomio; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_storescu_image_without_pixel_data_refused(node: RunningNode, tmp_path: Path) -> None:
    """DCMTK sends a CT data set without Pixel Data: 0xC210, quarantined, not stored."""
    path = write_ct_series(tmp_path / "nopix", 1)[0]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    before = set((node.home / "quarantine").glob("*.reason"))
    result = storescu(node.port, [path])
    output = result.stdout + result.stderr
    assert "Store Response (Error: CannotUnderstand)" in output, output
    reasons = set((node.home / "quarantine").glob("*.reason")) - before
    assert [r.read_text() for r in reasons] == ["image storage data set without pixel data\n"]
    assert not list(node.spool.rglob(f"{ds.SOPInstanceUID}*"))


def test_storescu_leading_zero_uid_recorded_and_spooled_by_hash(
    node: RunningNode, ledger: Ledger, tmp_path: Path
) -> None:
    """A UID DCMTK and Orthanc store (a leading-zero component) is accepted: the
    ledger keeps it as sent, the spool file is named by its hash."""
    path = write_ct_series(tmp_path / "zero", 1)[0]
    ds = pydicom.dcmread(path)
    uid = "1.2.826.0.1.3680043.2.1125.0042.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(uid)
    ds.save_as(path)
    result = storescu(node.port, [path])
    assert result.returncode == 0, result.stdout + result.stderr
    _applied(ledger)
    assert len(ledger.versions_of(uid)) == 1
    relpaths = ledger.instance_relpaths(str(ds.SeriesInstanceUID))
    assert [Path(r).name for r in relpaths] == [f"{path_part(uid)}.dcm"]
    assert pydicom.dcmread(node.spool / relpaths[0]).SOPInstanceUID == uid
