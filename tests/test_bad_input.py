"""Bad input on the receive path: refused with a named status, quarantined, never
acknowledged — and the association goes on (issues 13 and 16).

A raw socket plays the sender: it can send what real senders get wrong and pynetdicom
would not let us (a command whose UIDs differ from its data set's, a C-STORE on the
Verification context, unknown VR codes, a deflate bomb). After each refusal the same
association stores a good image: nothing was aborted.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from node.receive import upperlayer as ul
from node.receive.dicomio import MAX_INFLATED_BYTES
from node.receive.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_UID_MISMATCH,
    VERIFICATION_SOP_CLASS,
    Listener,
)
from node.store.spool import path_part
from tests.support.dcmtk import write_ct_series
from tests.support.listener import running_listener
from tests.support.net import wait_for

SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
#: Presentation context ids of the raw association: (abstract syntax, transfer syntax).
CONTEXTS = {
    1: (CTImageStorage, ExplicitVRLittleEndian),
    3: (CTImageStorage, DeflatedExplicitVRLittleEndian),
    5: (MRImageStorage, ExplicitVRLittleEndian),
    7: (VERIFICATION_SOP_CLASS, ImplicitVRLittleEndian),
}


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Listener]:
    with running_listener(tmp_path) as scp:
        yield scp


# A raw requestor ------------------------------------------------------------------------
def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _associate_rq() -> bytes:
    contexts = b"".join(
        _item(0x20, bytes([pcid, 0, 0, 0]) + _item(0x30, abstract.encode())
              + _item(0x40, syntax.encode()))
        for pcid, (abstract, syntax) in CONTEXTS.items()
    )
    user = _item(0x51, struct.pack(">L", 0)) + _item(0x52, b"1.2.3.4")
    body = (struct.pack(">HH", 1, 0) + b"QCNODE".ljust(16) + b"RAWPEER".ljust(16)
            + bytes(32) + _item(0x10, ul.APPLICATION_CONTEXT.encode()) + contexts
            + _item(0x50, user))
    return struct.pack(">BBL", ul.A_ASSOCIATE_RQ, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exact(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            assert chunk, "connection closed by the node"
            data += chunk
        return data

    kind, _, length = struct.unpack(">BBL", exact(6))
    return kind, exact(length)


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, tag, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" * (len(raw) % 2)


def _store_rq(sop_class: str, uid: str) -> bytes:
    body = (_element(0x0002, _ui(sop_class)) + _element(0x0100, b"\x01\x00")
            + _element(0x0110, b"\x07\x00") + _element(0x0700, b"\x00\x00")
            + _element(0x0800, b"\x00\x00") + _element(0x1000, _ui(uid)))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _pdu(pcid: int, control: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, pcid, control) + value
    return struct.pack(">BBL", ul.P_DATA_TF, 0, len(pdv)) + pdv


class Sender:
    """One association from a raw socket; :meth:`store` returns the response status."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=60)
        self.sock.sendall(_associate_rq())
        kind, _ = _read_pdu(self.sock)
        assert kind == ul.A_ASSOCIATE_AC

    def store(self, pcid: int, sop_class: str, uid: str, data: bytes) -> int:
        self.sock.sendall(_pdu(pcid, 0x03, _store_rq(sop_class, uid)))
        for start in range(0, len(data), 1 << 16):
            last = start + (1 << 16) >= len(data)
            self.sock.sendall(_pdu(pcid, 0x02 if last else 0x00, data[start:start + (1 << 16)]))
        kind, body = _read_pdu(self.sock)
        assert kind == ul.P_DATA_TF, f"PDU type {kind}: the association was not kept"
        command, pos, fields = body[6:], 0, {}
        while pos < len(command):
            _, element, length = struct.unpack_from("<HHL", command, pos)
            fields[element] = command[pos + 8 : pos + 8 + length]
            pos += 8 + length
        status: int = struct.unpack("<H", fields[0x0900])[0]
        return status

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBL", ul.A_RELEASE_RQ, 0, 4) + bytes(4))
        assert _read_pdu(self.sock)[0] == ul.A_RELEASE_RP
        self.sock.close()


# Data sets ----------------------------------------------------------------------------------
def _ct(tmp_path: Path) -> Dataset:
    return pydicom.dcmread(write_ct_series(tmp_path / "ct", 1)[0])


def _encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    return buf.getvalue()


def _with_raw_element(ds: Dataset, raw: bytes, tag: int) -> bytes:
    """``ds`` encoded Explicit VR Little Endian with ``raw`` (an encoded element of
    ``tag``) in its place among the others."""
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < tag else after).add(elem)
    return _encode(before) + raw + _encode(after)


def _deflate_bomb(ds: Dataset) -> bytes:
    """``ds`` with Pixel Data of MAX_INFLATED_BYTES + 1 MiB zeros, deflated (~300 KB)."""
    del ds.PixelData
    pixels = MAX_INFLATED_BYTES + (1 << 20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(_encode(ds)),
             deflater.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels))]
    zeros = bytes(1 << 20)
    parts += [deflater.compress(zeros) for _ in range(pixels >> 20)]
    parts.append(deflater.flush())
    return b"".join(parts)


def _quarantined(listener: Listener) -> list[str]:
    return sorted(p.read_text() for p in listener.spool.quarantine_dir.glob("*.reason"))


def _stored(listener: Listener, ds: Dataset) -> list[Path]:
    return list(listener.spool.root.rglob(f"{path_part(str(ds.SOPInstanceUID))}*.dcm"))


def _refused(listener: Listener, tmp_path: Path, pcid: int, sop_class: str, ds: Dataset,
             data: bytes, *, uid: str | None = None) -> int:
    """Send a bad data set, then a good one on the same association; the bad one's
    status (the good one must succeed: the association was kept)."""
    sender = Sender(listener.address)
    try:
        status = sender.store(pcid, sop_class, uid or str(ds.SOPInstanceUID), data)
        good = _ct(tmp_path / "good")
        assert sender.store(1, CTImageStorage, str(good.SOPInstanceUID),
                            _encode(good)) == STATUS_SUCCESS
    finally:
        sender.release()
    wait_for(lambda: _stored(listener, good), timeout=10, what="the good image applied")
    assert not _stored(listener, ds)
    return status


# Issue 13 ------------------------------------------------------------------------------------
def test_image_without_pixel_data_refused(listener: Listener, tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    del ds.PixelData
    assert _refused(listener, tmp_path, 1, CTImageStorage, ds, _encode(ds)) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == ["image storage data set without pixel data\n"]


def test_sop_instance_uid_differs_from_command_refused(listener: Listener, tmp_path: Path
                                                       ) -> None:
    ds = _ct(tmp_path)
    status = _refused(listener, tmp_path, 1, CTImageStorage, ds, _encode(ds), uid="1.2.3.4")
    assert status == STATUS_UID_MISMATCH
    assert _quarantined(listener) == ["dataset SOP Instance UID differs from the request\n"]


def test_uid_with_trailing_newline_refused(listener: Listener, tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    uid = "1.2.826.0.1.3680043.2.1125.77"  # short: the newline is within 64 characters
    ds.SeriesInstanceUID = uid + "9"  # pydicom would strip a newline when writing
    data = _encode(ds).replace(f"{uid}9".encode(), f"{uid}\n".encode())
    assert data.count(f"{uid}\n".encode()) == 1  # "$" in the old pattern matched before it
    assert _refused(listener, tmp_path, 1, CTImageStorage, ds, data) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == ["series_instance_uid missing or not a valid UID\n"]


def test_deflated_data_set_inflating_past_the_bound_refused(listener: Listener,
                                                            tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    bomb = _deflate_bomb(ds)
    assert len(bomb) < 2 << 20
    assert _refused(listener, tmp_path, 3, CTImageStorage, ds, bomb) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == [
        f"deflated dataset inflates beyond {MAX_INFLATED_BYTES} bytes\n"]


def test_deflated_data_set_within_the_bound_stored(listener: Listener, tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = deflater.compress(_encode(ds)) + deflater.flush()
    sender = Sender(listener.address)
    try:
        assert sender.store(3, CTImageStorage, str(ds.SOPInstanceUID), data) == STATUS_SUCCESS
    finally:
        sender.release()
    wait_for(lambda: _stored(listener, ds), timeout=10, what="deflated image applied")


@pytest.mark.parametrize(("error", "status"), [
    (RuntimeError("a bug"), STATUS_PROCESSING_FAILURE),
    (MemoryError(), STATUS_OUT_OF_RESOURCES),
])
def test_unexpected_error_while_storing_answers_instead_of_aborting(
    listener: Listener, tmp_path: Path, error: Exception, status: int
) -> None:
    """Fault injected in the spool's room check (runs after the header scan)."""
    ds = _ct(tmp_path)
    sender = Sender(listener.address)
    real = listener.spool.check_room

    def fail(incoming: int = 0) -> None:
        raise error

    try:
        listener.spool.check_room = fail  # type: ignore[method-assign]
        assert sender.store(1, CTImageStorage, str(ds.SOPInstanceUID), _encode(ds)) == status
        listener.spool.check_room = real  # type: ignore[method-assign]
        assert sender.store(1, CTImageStorage, str(ds.SOPInstanceUID), _encode(ds)) == (
            STATUS_SUCCESS)  # the same association, the same data set: now stored
    finally:
        sender.release()
    assert _quarantined(listener) == [f"internal error: {type(error).__name__}\n"]
    wait_for(lambda: _stored(listener, ds), timeout=10, what="the retried image applied")


# Issue 16 ------------------------------------------------------------------------------------
def test_unknown_vr_refused(listener: Listener, tmp_path: Path) -> None:
    """(3) "CQ" is no VR: pydicom cannot read it, so the node must not accept it."""
    ds = _ct(tmp_path)
    cq = struct.pack("<HH2sH", 0x0009, 0x0010, b"CQ", 4) + b"ABCD"
    data = _with_raw_element(ds, cq, 0x00090010)
    assert _refused(listener, tmp_path, 1, CTImageStorage, ds, data) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == ["unknown Value Representation 4351 (hex)\n"]


def test_unknown_vr_in_a_defined_length_sequence_item_refused(
    listener: Listener, tmp_path: Path
) -> None:
    ds = _ct(tmp_path)
    inner = (struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"T1"
             + struct.pack("<HH2sH", 0x0008, 0x0102, b"CQ", 2) + b"XX")
    item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
    sequence = struct.pack("<HH2sHL", 0x0008, 0x1032, b"SQ", 0, len(item)) + item
    data = _with_raw_element(ds, sequence, 0x00081032)
    assert _refused(listener, tmp_path, 1, CTImageStorage, ds, data) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == ["unknown Value Representation 4351 (hex)\n"]


def test_c_store_on_the_verification_context_refused(listener: Listener, tmp_path: Path
                                                     ) -> None:
    """(4) Verification is no storage class: 0x0122, whatever the data set holds."""
    ds = _ct(tmp_path)
    ds.SOPClassUID = MRImageStorage
    status = _refused(listener, tmp_path, 7, VERIFICATION_SOP_CLASS, ds,
                      _encode(ds, ImplicitVRLittleEndian))
    assert status == STATUS_SOP_CLASS_NOT_SUPPORTED


def test_command_sop_class_differs_from_data_set_refused(listener: Listener, tmp_path: Path
                                                         ) -> None:
    """(5) MR in the command (and the context), a CT data set: 0xA900."""
    ds = _ct(tmp_path)
    assert _refused(listener, tmp_path, 5, MRImageStorage, ds, _encode(ds)) == (
        STATUS_DATASET_MISMATCH)
    assert _quarantined(listener) == ["dataset SOP Class UID differs from the request\n"]


def test_uid_with_a_leading_zero_component_stored_under_a_safe_name(
    listener: Listener, tmp_path: Path
) -> None:
    """(7) Accepted as DCMTK and Orthanc accept it; the spool names it by a hash."""
    uid = "1.2.826.0.1.3680043.2.1125.01.2.3"
    ds = _ct(tmp_path)
    ds.SOPInstanceUID = ds.StudyInstanceUID = ds.SeriesInstanceUID = uid
    sender = Sender(listener.address)
    try:
        assert sender.store(1, CTImageStorage, uid, _encode(ds)) == STATUS_SUCCESS
    finally:
        sender.release()
    stored = wait_for(lambda: _stored(listener, ds), timeout=10, what="image applied")
    name = path_part(uid)
    assert name.startswith("uid-") and len(name) == 44
    assert stored[0].relative_to(listener.spool.root).parts == (name, name, f"{name}.dcm")
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == uid


def test_uid_longer_than_64_characters_refused(listener: Listener, tmp_path: Path) -> None:
    """(7) Refused before the Success: the ledger's UID columns hold 64 characters
    (PostgreSQL rejected the row after the Success) — see docs/architecture.md."""
    ds = _ct(tmp_path)
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125." + ".".join(["1234567890"] * 4)
    assert len(ds.SeriesInstanceUID) == 70
    assert _refused(listener, tmp_path, 1, CTImageStorage, ds, _encode(ds)) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == ["series_instance_uid missing or not a valid UID\n"]


def _rgb(tmp_path: Path) -> Dataset:
    """The CT image as 8-bit RGB (Samples per Pixel 3, Planar Configuration 0)."""
    ds = _ct(tmp_path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    return ds


def test_rgb_image_stored_with_its_planar_configuration(listener: Listener,
                                                        tmp_path: Path) -> None:
    """The control for the two refusals below: the same RGB image, well formed."""
    ds = _rgb(tmp_path)
    sender = Sender(listener.address)
    try:
        assert sender.store(1, CTImageStorage, str(ds.SOPInstanceUID),
                            _encode(ds)) == STATUS_SUCCESS
    finally:
        sender.release()
    wait_for(lambda: _stored(listener, ds), timeout=10, what="the RGB image applied")


@pytest.mark.parametrize("planar", [None, [0, 0], 2], ids=["missing", "two-values", "2"])
def test_rgb_image_without_a_valid_planar_configuration_refused(
        listener: Listener, tmp_path: Path, planar: list[int] | int | None) -> None:
    """Planar Configuration is Type 1C, required when Samples per Pixel is 3 (PS3.3
    C.7.6.3), one value, 0 or 1: pydicom (the quality engine's reader) cannot decode
    the pixels without it. All three answered Success before."""
    ds = _rgb(tmp_path)
    if planar is None:
        del ds.PlanarConfiguration
    else:
        ds.PlanarConfiguration = planar
    assert _refused(listener, tmp_path, 1, CTImageStorage, ds, _encode(ds)) == (
        STATUS_CANNOT_UNDERSTAND)
    assert _quarantined(listener) == ["planar configuration missing or not 0/1\n"]
