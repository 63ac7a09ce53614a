"""Association negotiation of the listener (node.negotiation) with real requestors.

pynetdicom and DCMTK as senders: retired storage SOP classes are accepted; a request
that cannot be decoded is aborted as malformed (A-ABORT, invalid PDU parameter) rather
than failing with a traceback; roles, identity and the asynchronous window answered.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role

from node import upperlayer as ul
from node.config import Settings
from node.scp import STATUS_SUCCESS, Listener
from node.spool import Spool
from tests.support.dcmtk import storescu, successes
from tests.support.net import wait_for
from tests.test_acceptor import _associate_rq, _expect_abort, _read_pdu

#: Ultrasound Image Storage (Retired), PS3.6 Annex A: not in pynetdicom's
#: AllStoragePresentationContexts, still sent by older ultrasound devices.
US_IMAGE_STORAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Listener]:
    settings = Settings.model_validate({
        "node": {"ae_title": "QCNODE", "host": "127.0.0.1", "port": 0,
                 "home": str(tmp_path), "acse_timeout": 2.0, "network_timeout": 5.0},
        "senders": [{"ae_title": "*", "host": "127.0.0.1"}],
        "spool": {"min_free_bytes": 0, "min_free_percent": 0.0},
    })
    scp = Listener(settings, Spool(settings.spool_dir, tmp_path), None)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(5.0)


def _retired_us_image(path: Path) -> pydicom.Dataset:
    """A real RGB image (pydicom's test file) as a retired US Image Storage instance."""
    source = get_testdata_file("SC_rgb_small_odd.dcm")
    assert isinstance(source, str)
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(US_IMAGE_STORAGE_RETIRED)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_retired_us_image_storage_accepted_from_pynetdicom_and_storescu(
    listener: Listener, tmp_path: Path
) -> None:
    """Before: result 3 (abstract syntax not supported), the C-STORE impossible."""
    ds = _retired_us_image(tmp_path / "us.dcm")
    ae = AE(ae_title="OLDUS")
    ae.add_requested_context(US_IMAGE_STORAGE_RETIRED, [ExplicitVRLittleEndian])
    assoc = ae.associate(*listener.address, ae_title="QCNODE")
    try:
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [
            US_IMAGE_STORAGE_RETIRED]
        assert assoc.send_c_store(ds).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert wait_for(lambda: list(listener.spool.root.rglob(f"{ds.SOPInstanceUID}.dcm")),
                    timeout=10, what="instance applied")
    again = _retired_us_image(tmp_path / "us2.dcm")
    run = storescu(listener.address[1], [tmp_path / "us2.dcm"])
    assert successes(run.stdout + run.stderr) == [tmp_path / "us2.dcm"], (
        run.stdout + run.stderr)
    assert wait_for(lambda: list(listener.spool.root.rglob(f"{again.SOPInstanceUID}.dcm")),
                    timeout=10, what="instance applied")


def test_non_ascii_transfer_syntax_is_a_malformed_request(listener: Listener) -> None:
    """Before: UnicodeEncodeError while encoding the AC (a traceback, A-ABORT with
    reason 'not specified'). Now the request is refused as malformed, and the node
    serves the next one."""
    rq = _associate_rq(0).replace(b"1.2.840.10008.1.2", b"1.2.840.10008.1.\xb2")
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(rq)
        _expect_abort(sock, ul.ABORT_INVALID_PDU_PARAMETER)
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(_associate_rq(0))
        assert _read_pdu(sock)[0] == ul.A_ASSOCIATE_AC


def test_roles_answered_with_ours(listener: Listener) -> None:
    """Role selection proposed for a storage class: the AC answers SCU yes, SCP no
    (the requestor stores, we never send on its association, PS3.7 D.3.3.4)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    roles = build_role(pydicom.uid.CTImageStorage, scu_role=True, scp_role=True)
    assoc = ae.associate(*listener.address, ae_title="QCNODE", ext_neg=[roles])
    try:
        assert assoc.is_established
        reply = assoc.acceptor.role_selection[pydicom.uid.CTImageStorage]
        assert (reply.scu_role, reply.scp_role) == (True, False)
        (cx,) = assoc.accepted_contexts
        assert (cx.as_scu, cx.as_scp) == (True, False)
    finally:
        assoc.release()
