"""Association negotiation of the listener (node.receive.negotiation) with real requestors.

pynetdicom and DCMTK as senders: retired storage SOP classes are accepted; a request
that cannot be decoded is aborted as malformed (A-ABORT, invalid PDU parameter) rather
than failing with a traceback; roles, identity and the asynchronous window answered.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.pdu import A_ASSOCIATE_AC

from node.receive import upperlayer as ul
from node.receive.scp import STATUS_SUCCESS, Listener
from tests.support.dcmtk import echoscu, storescu, successes, write_ct_series
from tests.support.listener import running_listener
from tests.support.net import wait_for
from tests.support.orthanc import running_orthanc
from tests.test_acceptor import _associate_rq, _expect_abort, _read_pdu

#: Ultrasound Image Storage (Retired), PS3.6 Annex A: not in pynetdicom's
#: AllStoragePresentationContexts, still sent by older ultrasound devices.
US_IMAGE_STORAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Listener]:
    with running_listener(tmp_path, network_timeout=5.0) as scp:
        yield scp


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


def _long_request(contexts: int, syntaxes: int) -> bytes:
    """An A-ASSOCIATE-RQ of ``contexts`` CT contexts proposing ``syntaxes`` transfer
    syntaxes each (1.2.840.10008.1.2.4.0 …: JPEG 2000 Lossless, .90, among them)."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value
    proposed = b"".join(item(0x40, b"1.2.840.10008.1.2.4.%d" % j) for j in range(syntaxes))
    body = (struct.pack(">HH", 1, 0) + b"QCNODE".ljust(16) + b"FORWARDER".ljust(16)
            + bytes(32) + item(0x10, ul.APPLICATION_CONTEXT.encode())
            + b"".join(item(0x20, bytes([2 * i + 1, 0, 0, 0])
                            + item(0x30, pydicom.uid.CTImageStorage.encode()) + proposed)
                       for i in range(contexts))
            + item(0x50, item(0x51, struct.pack(">L", 0))))
    return struct.pack(">BBL", ul.A_ASSOCIATE_RQ, 0, len(body)) + body


def test_a_long_request_neither_stalls_the_listener_nor_loses_our_choice(
    listener: Listener,
) -> None:
    """A 1 MiB request (128 contexts × 300 transfer syntaxes) took 3.4–7.9 s of the
    event loop in pynetdicom's decoding, every other association waiting; now the
    transfer syntaxes that change nothing are cut first and it is decoded off the loop
    (0.17 s)."""
    rq = _long_request(128, 300)
    assert len(rq) > 1_000_000
    with socket.create_connection(listener.address, timeout=30) as sock:
        sock.sendall(rq)
        start = time.monotonic()
        echo = echoscu(listener.address[1])
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert time.monotonic() - start < 1.5  # was 3.4 s here (7.9 s alone)
        kind, body = _read_pdu(sock)
        assert kind == ul.A_ASSOCIATE_AC
        ac = A_ASSOCIATE_AC()
        ac.decode(struct.pack(">BBL", kind, 0, len(body)) + body)
        results = ac.to_primitive().presentation_context_definition_results_list
        assert len(results) == 128
        assert {(cx.result, str(cx.transfer_syntax[0])) for cx in results} == {
            (ul.PC_ACCEPTANCE, pydicom.uid.JPEG2000Lossless)}


def test_orthanc_store_job_with_a_retired_class_completes(
    listener: Listener, tmp_path: Path
) -> None:
    """Orthanc sends a study of a CT and a retired US image to the node in one job.
    Before: the US context was refused and Orthanc's job failed half-way."""
    ct = write_ct_series(tmp_path / "ct", 1)[0]
    us = _retired_us_image(tmp_path / "us.dcm")
    with running_orthanc(tmp_path / "orthanc", peers={"QCNODE": listener.address[1]}) as pacs:
        for path in (ct, tmp_path / "us.dcm"):
            pacs._request("POST", "/instances", path.read_bytes())
        ids = pacs.instances()
        assert len(ids) == 2
        pacs.post_json("/modalities/peer0/store", {"Resources": ids, "Synchronous": True})
    uids = {str(pydicom.dcmread(ct).SOPInstanceUID), str(us.SOPInstanceUID)}
    wait_for(lambda: {p.stem for p in listener.spool.root.rglob("*.dcm")} >= uids,
             timeout=10, what="both instances applied")
