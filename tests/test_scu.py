"""node.send.scu against a real Orthanc: store + confirm, failure classification, qcnode echo."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.config import DestinationSettings
from node.send.scu import (
    STATUS_SUCCESS,
    DeliveryError,
    Reason,
    classify_rejection,
    classify_store_status,
    deliver,
    echo,
)
from tests.support.net import free_port
from tests.support.orthanc import Orthanc, running_orthanc

NODE_AE = "QCNODE"


@pytest.fixture(scope="module")
def commit_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, commit_port: int) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), {NODE_AE: commit_port}) as server:
        yield server


def _dest(pacs: Orthanc, **kw: object) -> DestinationSettings:
    base: dict[str, object] = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                               "port": pacs.dicom_port, "timeout": 5.0}
    return DestinationSettings.model_validate({**base, **kw})


def _fresh_ct() -> pydicom.Dataset:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_store_confirmed_by_cfind(pacs: Orthanc) -> None:
    ds = _fresh_ct()
    receipt = deliver([ds], _dest(pacs, confirm="find"), node_ae=NODE_AE)
    assert receipt.confirmation == "find"
    assert receipt.statuses == (STATUS_SUCCESS,)
    assert len(pacs.find_sop(ds.SOPInstanceUID)) == 1


def test_store_confirmed_by_storage_commitment(pacs: Orthanc, commit_port: int) -> None:
    ds = _fresh_ct()
    dest = _dest(pacs, confirm="auto", commitment_port=commit_port)
    receipt = deliver([ds], dest, node_ae=NODE_AE, bind_host="127.0.0.1")
    assert receipt.confirmation == "commitment"
    assert len(pacs.find_sop(ds.SOPInstanceUID)) == 1
    # Orthanc got a success N-EVENT-REPORT-RSP (the handler once returned a bare int:
    # pynetdicom aborted, Orthanc's job failed "Unable to read N-EVENT-REPORT response").
    assert receipt.transaction_uid is not None
    job = pacs.commitment_job(receipt.transaction_uid)
    assert job["State"] == "Success", job.get("ErrorDetails")


def test_same_object_twice_is_one_instance(pacs: Orthanc) -> None:
    ds = _fresh_ct()
    for _ in range(2):
        deliver([copy.deepcopy(ds)], _dest(pacs, confirm="find"), node_ae=NODE_AE)
    assert len(pacs.find_sop(ds.SOPInstanceUID)) == 1


def test_refused_connection_is_transient() -> None:
    dest = DestinationSettings(name="x", ae_title="ORTHANC", host="127.0.0.1",
                               port=free_port(), timeout=3.0)
    with pytest.raises(DeliveryError) as info:
        deliver([_fresh_ct()], dest, node_ae=NODE_AE)
    assert info.value.failure.reason is Reason.CONNECTION_REFUSED
    assert info.value.transient


def test_wrong_called_ae_is_permanent(pacs: Orthanc) -> None:
    with pytest.raises(DeliveryError) as info:
        echo(_dest(pacs, ae_title="NOTORTHANC"), node_ae=NODE_AE)
    assert info.value.failure.reason is Reason.REJECTED_CALLED_AE
    assert not info.value.transient


def test_unknown_calling_ae_is_permanent(tmp_path: Path) -> None:
    with running_orthanc(tmp_path, {NODE_AE: 104}, always_allow_store=False,
                         extra={"DicomAlwaysAllowEcho": False}) as strict:
        dest = _dest(strict, calling_ae_title="STRANGER")
        with pytest.raises(DeliveryError) as info:
            deliver([_fresh_ct()], dest, node_ae=NODE_AE)
        assert info.value.failure.reason is Reason.REJECTED_CALLING_AE
        assert not info.value.transient
        # The node's own AE (known to the PACS) gets through.
        assert deliver([_fresh_ct()], _dest(strict, confirm="find"), node_ae=NODE_AE)


@pytest.mark.parametrize(("status", "expected"), [
    (0x0000, None), (0xB000, None), (0xB007, None),
    (0xA700, Reason.STORE_TRANSIENT), (0xA7FF, Reason.STORE_TRANSIENT),
    (0x0110, Reason.STORE_TRANSIENT),
    (0xA900, Reason.STORE_PERMANENT), (0xC000, Reason.STORE_PERMANENT),
    (0xC2FF, Reason.STORE_PERMANENT), (0x0122, Reason.STORE_PERMANENT),
])
def test_store_status_classes(status: int, expected: Reason | None) -> None:
    assert classify_store_status(status) is expected


def test_rejection_classes() -> None:
    assert classify_rejection(1, 1, 7) is Reason.REJECTED_CALLED_AE
    assert classify_rejection(1, 1, 3) is Reason.REJECTED_CALLING_AE
    assert classify_rejection(2, 3, 1) is Reason.BUSY
    assert classify_rejection(1, 2, 2) is Reason.REJECTED


def _run_echo(tmp_path: Path, port: int, ae: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / f"qcnode-{port}-{ae}.toml"
    cfg.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nhome = "{tmp_path}"\n\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "{ae}"\nhost = "127.0.0.1"\n'
        f"port = {port}\ntimeout = 3.0\n"
    )
    return subprocess.run([sys.executable, "-m", "node.cli", "echo", "--config", str(cfg), "pacs"],
                          check=False, capture_output=True, text=True, timeout=60)


def test_echo_cli_speaks_words(pacs: Orthanc, tmp_path: Path) -> None:
    ok = _run_echo(tmp_path, pacs.dicom_port, pacs.ae_title)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK pacs")
    wrong_ae = _run_echo(tmp_path, pacs.dicom_port, "NOTORTHANC")
    assert wrong_ae.returncode == 1
    assert "wrong called AE title" in wrong_ae.stdout
    assert "set ae_title to the PACS's own AE title" in wrong_ae.stdout
    refused = _run_echo(tmp_path, free_port(), pacs.ae_title)
    assert refused.returncode == 1
    assert "connection refused" in refused.stdout
