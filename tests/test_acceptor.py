"""The listener's own Upper Layer (node.receive.acceptor) against pynetdicom as the requestor.

pynetdicom is a real, independent DICOM implementation: it proposes what scanners
propose (role selection, SOP class extended negotiation, several transfer syntaxes) and
checks our A-ASSOCIATE-AC and C-STORE-RSP. A raw socket checks the byte-level limits
(the requestor's Maximum Length, unexpected PDUs) that pynetdicom does not enforce.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)

from node.receive import upperlayer as ul
from node.receive.acceptor import Peer, StoreRequest
from node.receive.scp import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    STATUS_SUCCESS,
    Listener,
)
from tests.support.dcmtk import echoscu, storescu, successes, write_ct_series
from tests.support.listener import make_listener, running_listener
from tests.support.net import wait_for

FIND_SOP_CLASS = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Q/R FIND: not ours
VERIFICATION = "1.2.840.10008.1.1"
RESULT_ACCEPTED = 0x00
RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
RESULT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Listener]:
    with running_listener(tmp_path, network_timeout=5.0) as scp:
        yield scp


def test_negotiation_roles_extended_negotiation_and_store(
    listener: Listener, tmp_path: Path
) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, JPEG2000Lossless])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, ["1.2.3.4.5.6"])  # no such transfer syntax
    ae.add_requested_context(FIND_SOP_CLASS, [ImplicitVRLittleEndian])
    ae.add_requested_context(VERIFICATION)
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = CTImageStorage
    ext.service_class_application_information = b"\x01"
    roles = build_role(CTImageStorage, scu_role=True, scp_role=True)
    host, port = listener.address
    assoc = ae.associate(host, port, ae_title="QCNODE", ext_neg=[roles, ext])
    try:
        assert assoc.is_established
        results = [(str(cx.abstract_syntax), cx.result, str(cx.transfer_syntax[0]))
                   for cx in assoc.accepted_contexts + assoc.rejected_contexts]
        # Ours preferred: the compressed syntax the sender also proposed.
        assert (CTImageStorage, RESULT_ACCEPTED, JPEG2000Lossless) in results
        assert any(a == CTImageStorage and r == RESULT_TRANSFER_SYNTAXES_NOT_SUPPORTED
                   for a, r, _ in results)
        assert any(a == FIND_SOP_CLASS and r == RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED
                   for a, r, _ in results)
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
        ds = pydicom.dcmread(write_ct_series(tmp_path / "ct", 1)[0])
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        status = assoc.send_c_store(ds)  # pynetdicom converts: Explicit VR LE context
        assert status.Status == STATUS_SUCCESS
    finally:
        assoc.release()
    assert not assoc.is_aborted
    stored = _applied(listener, str(ds.SOPInstanceUID))
    assert len(stored) == 1
    back = pydicom.dcmread(stored[0])
    assert back.PixelData == ds.PixelData
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def _applied(listener: Listener, uid: str) -> list[Path]:
    """The spool file(s) of ``uid`` once applied from the receive journal (a Success
    means durable in the journal; the spool file follows shortly)."""
    return wait_for(lambda: list(listener.spool.root.rglob(f"{uid}.dcm")), timeout=10,
                    what="instance applied from the journal")


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _associate_rq(max_length: int, abstract: str = VERIFICATION) -> bytes:
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode()) + _item(
        0x40, ImplicitVRLittleEndian.encode())
    user = _item(0x51, struct.pack(">L", max_length)) + _item(0x52, b"1.2.3.4")
    body = (struct.pack(">HH", 1, 0) + b"QCNODE".ljust(16) + b"RAWPEER".ljust(16)
            + bytes(32) + _item(0x10, ul.APPLICATION_CONTEXT.encode())
            + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBL", ul.A_ASSOCIATE_RQ, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        assert chunk, "connection closed"
        head += chunk
    kind, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed"
        body += chunk
    return kind, body


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, tag, len(value)) + value


def _p_data(control: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, 1, control) + value
    return struct.pack(">BBL", ul.P_DATA_TF, 0, len(pdv)) + pdv


def _echo_rq() -> bytes:
    body = (_element(0x0002, VERIFICATION.encode()) + _element(0x0100, b"\x30\x00")
            + _element(0x0110, b"\x07\x00") + _element(0x0800, b"\x01\x01"))
    return _p_data(0x03, _element(0x0000, struct.pack("<L", len(body))) + body)


def test_requestor_maximum_length_honoured_and_unexpected_pdu_aborts(
    listener: Listener,
) -> None:
    max_length = 32  # the C-ECHO-RSP (~70 bytes) must come in several PDUs
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(_associate_rq(max_length))
        kind, _ = _read_pdu(sock)
        assert kind == ul.A_ASSOCIATE_AC
        sock.sendall(_echo_rq())
        command = b""
        while True:
            kind, body = _read_pdu(sock)
            assert kind == ul.P_DATA_TF and len(body) <= max_length
            pdv_length, pcid, control = struct.unpack(">LBB", body[:6])
            assert pcid == 1 and control & 0x01 and pdv_length == len(body) - 4
            command += body[6:]
            if control & 0x02:
                break
        assert len(command) > max_length
        status_at = command.index(struct.pack("<HHL", 0, 0x0900, 2))
        assert command[status_at + 8 : status_at + 10] == struct.pack("<H", STATUS_SUCCESS)
        sock.sendall(struct.pack(">BBL", ul.A_ASSOCIATE_AC, 0, 0))  # not allowed now
        kind, body = _read_pdu(sock)
        assert kind == ul.A_ABORT
        assert sock.recv(16) == b""  # and the node closed the connection


def test_called_ae_must_be_ours(listener: Listener) -> None:
    with socket.create_connection(listener.address, timeout=10) as sock:
        rq = bytearray(_associate_rq(0))
        rq[10:26] = b"SOMEONEELSE".ljust(16)
        sock.sendall(bytes(rq))
        kind, body = _read_pdu(sock)
        assert kind == ul.A_ASSOCIATE_RJ
        assert body[1:] == bytes([ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                                  ul.RJ_CALLED_AE_NOT_RECOGNISED])


def test_abort_mid_data_set_leaves_no_file(listener: Listener) -> None:
    """Guaranteed: a data set cut off by A-ABORT leaves no spool file, no temporary
    file and no committed journal record, and the listener keeps serving."""
    uid = "1.2.826.0.1.3680043.8.498.1"
    body = (_element(0x0002, CTImageStorage.encode()) + _element(0x0100, b"\x01\x00")
            + _element(0x0110, b"\x01\x00") + _element(0x0700, b"\x00\x00")
            + _element(0x0800, b"\x00\x00") + _element(0x1000, uid.encode()))
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(_associate_rq(0, CTImageStorage))
        assert _read_pdu(sock)[0] == ul.A_ASSOCIATE_AC
        sock.sendall(_p_data(0x03, _element(0x0000, struct.pack("<L", len(body))) + body))
        sock.sendall(_p_data(0x00, bytes(4096)))  # a first, not last, data set fragment
        wait_for(listener.journal.active_segments, timeout=10,
                 what="reception under way (a journal segment taken)")
        sock.sendall(struct.pack(">BBL", ul.A_ABORT, 0, 4) + bytes(4))
        assert sock.recv(16) == b""
    wait_for(lambda: not listener.journal.active_segments(), timeout=10,
             what="segment retired")
    assert not list(listener.spool.root.rglob("*.dcm"))
    assert not any(listener.spool.tmp.iterdir())
    assert echoscu(listener.address[1]).returncode == 0


@pytest.mark.parametrize("identity", [["-usr", "bob", "-pwd", "secret"], ["-usr", "bob"]])
def test_user_identity_positive_response_storescu(
    listener: Listener, tmp_path: Path, identity: list[str]
) -> None:
    """DCMTK fails the association unless the AC answers a requested positive response."""
    files = write_ct_series(tmp_path / "ct", 2)
    run = storescu(listener.address[1], files, options=[*identity, "-rsp"])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "User Identity Negotiation failed" not in run.stdout + run.stderr
    assert sorted(successes(run.stdout + run.stderr)) == sorted(files)


def _expect_abort(sock: socket.socket, reason: int | None = None) -> None:
    kind, body = _read_pdu(sock)
    assert kind == ul.A_ABORT
    if reason is not None:
        assert body[3] == reason
    # then the node closes (a reset when our unread bytes were still queued)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(16) == b""


def test_garbage_oversized_and_malformed_pdus_abort_and_node_keeps_serving(
    listener: Listener,
) -> None:
    address = listener.address
    with socket.create_connection(address, timeout=10) as sock:  # not a DICOM peer
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        _expect_abort(sock, ul.ABORT_UNEXPECTED_PDU)
    with socket.create_connection(address, timeout=10) as sock:  # item overruns the PDU
        rq = bytearray(_associate_rq(0))
        rq[76:78] = struct.pack(">H", 0x7FFF)  # application context item length
        sock.sendall(bytes(rq))
        _expect_abort(sock, ul.ABORT_INVALID_PDU_PARAMETER)
    oversized = [
        struct.pack(">BBL", ul.P_DATA_TF, 0, 0xFFFFFFF0),  # beyond our Maximum Length
        struct.pack(">BBL", ul.A_RELEASE_RQ, 0, 0xFFFFFFF0),  # must be 4
        struct.pack(">BBL", 0x99, 0, 4) + bytes(4),  # unknown PDU type
    ]
    for pdu in oversized:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(_associate_rq(0))
            assert _read_pdu(sock)[0] == ul.A_ASSOCIATE_AC
            sock.sendall(pdu)
            _expect_abort(sock)
    run = echoscu(address[1])
    assert run.returncode == 0, run.stdout + run.stderr


def _dataset_bytes(path: Path) -> tuple[pydicom.Dataset, bytes]:
    """The data set of ``path`` encoded Implicit VR Little Endian, without file meta."""
    ds = pydicom.dcmread(path)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return ds, buf.getvalue()


def _store_rq(sop_class: str, uid: str, message_id: int) -> bytes:
    body = (_element(0x0002, sop_class.encode() + b"\0" * (len(sop_class) % 2))
            + _element(0x0100, b"\x01\x00") + _element(0x0110, struct.pack("<H", message_id))
            + _element(0x0700, b"\x00\x00") + _element(0x0800, b"\x00\x00")
            + _element(0x1000, uid.encode() + b"\0" * (len(uid) % 2)))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _pdv(control: int, value: bytes) -> bytes:
    return struct.pack(">LBB", len(value) + 2, 1, control) + value


def _pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", ul.P_DATA_TF, 0, len(body)) + body


def _response(sock: socket.socket) -> dict[int, bytes]:
    command = b""
    while True:
        kind, body = _read_pdu(sock)
        assert kind == ul.P_DATA_TF
        command += body[6:]
        if body[5] & 0x02:
            break
    fields, pos = {}, 0
    while pos < len(command):
        _, element, length = struct.unpack_from("<HHL", command, pos)
        fields[element] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return fields


def test_command_and_data_pdvs_mixed_in_pdus_then_release_while_idle(
    listener: Listener, tmp_path: Path
) -> None:
    """Command + first data fragment in one PDU, the rest as several PDVs per PDU."""
    ds, raw = _dataset_bytes(write_ct_series(tmp_path / "ct", 1)[0])
    uid = str(ds.SOPInstanceUID)
    parts = [raw[i : i + 1000] for i in range(0, len(raw), 1000)]
    with socket.create_connection(listener.address, timeout=10) as sock:
        sock.sendall(_associate_rq(0, CTImageStorage))
        assert _read_pdu(sock)[0] == ul.A_ASSOCIATE_AC
        sock.sendall(_pdu(_pdv(0x03, _store_rq(CTImageStorage, uid, 41)), _pdv(0x00, parts[0])))
        rest = parts[1:]
        for i in range(0, len(rest), 3):
            group = rest[i : i + 3]
            last_group = i + 3 >= len(rest)
            sock.sendall(_pdu(*(
                _pdv(0x02 if last_group and j == len(group) - 1 else 0x00, part)
                for j, part in enumerate(group))))
        fields = _response(sock)
        assert fields[0x0900] == struct.pack("<H", STATUS_SUCCESS)
        assert fields[0x0100] == struct.pack("<H", 0x8001)
        assert fields[0x0120] == struct.pack("<H", 41)
        assert fields[0x1000].rstrip(b"\0").decode() == uid
        assert fields[0x0002].rstrip(b"\0").decode() == CTImageStorage
        assert 0x0902 not in fields  # no Error Comment on success
        sock.sendall(struct.pack(">BBL", ul.A_RELEASE_RQ, 0, 4) + bytes(4))
        assert _read_pdu(sock)[0] == ul.A_RELEASE_RP
    stored = _applied(listener, uid)
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData


def test_failure_status_carries_error_comment(listener: Listener, tmp_path: Path) -> None:
    """pynetdicom reads the C-STORE-RSP of a truncated data set: status and comment."""
    ds = pydicom.dcmread(write_ct_series(tmp_path / "ct", 1)[0])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(*listener.address, ae_title="QCNODE")
    try:
        assert assoc.is_established
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert 0xC000 <= status.Status <= 0xCFFF
    assert 0 < len(status.ErrorComment) <= 64


def test_pynetdicom_identity_async_window_and_ac_contents(listener: Listener) -> None:
    """The AC: our implementation UID/version and Maximum Length, an empty server
    response for the username+passcode identity, no asynchronous window (default 1/1)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.positive_response_requested = True
    identity.primary_field, identity.secondary_field = b"bob", b"secret"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    roles = build_role(CTImageStorage, scu_role=True, scp_role=True)
    assoc = ae.associate(*listener.address, ae_title="QCNODE",
                         ext_neg=[identity, window, roles])
    try:
        assert assoc.is_established
        acceptor = assoc.acceptor
        assert acceptor.user_identity is not None
        assert acceptor.user_identity.server_response == b""
        assert acceptor.asynchronous_operations == (1, 1)
        assert acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert acceptor.maximum_length == listener.settings.node.max_pdu
        assert acceptor.ae_title == "QCNODE"
    finally:
        assoc.release()


def test_large_image_in_4096_byte_pdus_with_jpeg_lossless_proposed(
    listener: Listener, tmp_path: Path
) -> None:
    """A 512x512 image crosses the wire as ~130 P-DATA-TF PDUs and arrives intact."""
    ds = pydicom.dcmread(write_ct_series(tmp_path / "ct", 1)[0])
    ds.Rows = ds.Columns = 512
    ds.PixelData = np.random.default_rng(7).integers(0, 4000, (512, 512), np.uint16).tobytes()
    path = tmp_path / "big.dcm"
    ds.save_as(path)
    run = storescu(listener.address[1], [path],
                   options=["--max-send-pdu", "4096", "--propose-lossless"])
    assert successes(run.stdout + run.stderr) == [path], run.stdout + run.stderr
    stored = _applied(listener, str(ds.SOPInstanceUID))
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).PixelData == ds.PixelData


def test_a_store_waiting_for_its_disk_holds_up_no_other_association(tmp_path: Path) -> None:
    """Guarantee: one thread serves every association, so a store that waits (a slow
    disk, a busy ledger) must not stall the others: it runs off the event loop, its
    own association neither times out meanwhile (the node is slow, not the peer) nor
    loses its Success, and DCMTK storescu / echoscu are served in the meantime."""
    listener = make_listener(tmp_path, network_timeout=1.0)
    listener.start()
    slow = pydicom.dcmread(write_ct_series(tmp_path / "slow", 1)[0])
    others = write_ct_series(tmp_path / "others", 3)
    real_store, gate, entered = listener.store, threading.Event(), threading.Event()

    def store(peer: Peer, request: StoreRequest) -> int:
        if request.sop_instance_uid == slow.SOPInstanceUID:
            entered.set()
            assert gate.wait(30)
        return real_store(peer, request)

    listener.store = store  # type: ignore[method-assign]
    ae = AE(ae_title="SLOWDISK")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    held = ae.associate(*listener.address, ae_title="QCNODE")
    idle = ae.associate(*listener.address, ae_title="QCNODE")  # a second open association
    statuses: list[int] = []
    try:
        assert held.is_established and idle.is_established
        sender = threading.Thread(
            target=lambda: statuses.append(int(held.send_c_store(slow).Status)))
        sender.start()
        assert entered.wait(10)
        since = time.monotonic()
        port = listener.address[1]
        echo = echoscu(port)
        result = storescu(port, others)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(successes(result.stdout + result.stderr)) == 3
        assert sender.is_alive()  # still waiting for its disk
        # Held past the network timeout (1 s): the guarantee under test, not a wait.
        time.sleep(max(0.0, since + 1.5 - time.monotonic()))
        gate.set()
        sender.join(10)
        assert statuses == [STATUS_SUCCESS]
    finally:
        gate.set()
        held.release()
        idle.release()
        listener.stop(5.0)
    assert not held.is_aborted
    assert _applied(listener, str(slow.SOPInstanceUID))
