"""Captured DICOM association streams and seeded mutations of them (issue 16).

:func:`capture` records the bytes pynetdicom sends to a real ``qcnode serve`` through a
recording TCP proxy: association + C-ECHO + release, and association + C-STORE of a
small CT + release. :func:`mutate` turns a captured stream into one fuzz case from a
``random.Random`` seeded per case (same seed and index, same bytes): PDU framing (PS3.8
§9.3: PDU and item lengths, presentation context IDs, PDV headers, PDU order), byte
level (bit flips, inserts, deletes, truncation) and the C-STORE data set itself (wrong
VR, truncated Pixel Data, a wrong group length, another SOP Instance UID).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.fuzz_dataset import flip, mutate_data_set
from tests.support.labelled import write_ct

P_DATA_TF, A_ASSOCIATE_RQ, A_RELEASE_RQ = 0x04, 0x01, 0x05
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
_HEADER = struct.Struct(">BBL")


@dataclass(frozen=True)
class Pdu:
    """One PDU: type and body (PS3.8 §9.3.1)."""

    kind: int
    body: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.kind, 0, len(self.body)) + self.body


@dataclass(frozen=True)
class Captured:
    """A captured stream, split into PDUs; ``data_set`` is the C-STORE's data set."""

    name: str
    pdus: tuple[Pdu, ...]
    data_set: bytes = b""


@dataclass(frozen=True)
class Case:
    """One fuzz case: the bytes to send and how they were made."""

    index: int
    stream: str
    mutation: str
    data: bytes
    data_set_mutated: bool  # the C-STORE data set itself was changed (then re-framed)


def split_pdus(data: bytes) -> tuple[Pdu, ...]:
    """The PDUs of a well-formed stream."""
    pdus, pos = [], 0
    while pos + 6 <= len(data):
        kind, _, length = _HEADER.unpack_from(data, pos)
        pdus.append(Pdu(kind, data[pos + 6:pos + 6 + length]))
        pos += 6 + length
    return tuple(pdus)


def pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    """``(context id, control header, value)`` of a well-formed P-DATA-TF body."""
    out, pos = [], 0
    while pos + 6 <= len(body):
        length = int.from_bytes(body[pos:pos + 4], "big")
        out.append((body[pos + 4], body[pos + 5], body[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out


def pdv(pcid: int, control: int, value: bytes) -> bytes:
    """One PDV item (PS3.8 §9.3.5.1)."""
    return struct.pack(">LBB", len(value) + 2, pcid, control) + value


# Capturing ---------------------------------------------------------------------------------
def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            if record is not None:
                record += data
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def record_sender(node_port: int, send: Callable[[int], None]) -> bytes:
    """What ``send(proxy_port)`` sends to the node through a recording proxy."""
    recorded = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)

        def proxy() -> None:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", node_port))
            back = threading.Thread(target=_pump, args=(upstream, client, None))
            back.start()
            _pump(client, upstream, recorded)
            back.join(30)
            client.close()
            upstream.close()

        thread = threading.Thread(target=proxy)
        thread.start()
        send(listener.getsockname()[1])
        thread.join(30)
    return bytes(recorded)


#: Fixed UIDs: the captured bytes, and so every case of a seed, are the same each run.
FUZZ_UID_ROOT = "1.2.826.0.1.3680043.8.498.16"


def small_ct(folder: Path) -> Dataset:
    """A 16×16 CT Image Storage instance (PS3.3 A.3) with fixed UIDs."""
    rng = np.random.default_rng(0)
    path = folder / "fuzz-ct.dcm"
    write_ct(path, rng.normal(40, 10, (16, 16)), series=f"{FUZZ_UID_ROOT}.2",
             study=f"{FUZZ_UID_ROOT}.1", z=0.0)
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{FUZZ_UID_ROOT}.3")
    return ds


def capture(node_port: int, folder: Path, ae_title: str = "QCNODE") -> list[Captured]:
    """C-ECHO and C-STORE streams that pynetdicom sends to the node at ``node_port``."""
    ds = small_ct(folder)

    def echo(port: int) -> None:
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()

    def store(port: int) -> None:
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        assert assoc.is_established and assoc.send_c_store(ds).Status == 0
        assoc.release()

    store_pdus = split_pdus(record_sender(node_port, store))
    data_set = b"".join(value for pdu in store_pdus if pdu.kind == P_DATA_TF
                        for _, control, value in pdvs(pdu.body) if not control & 1)
    return [Captured("echo", split_pdus(record_sender(node_port, echo))),
            Captured("store", store_pdus, data_set)]


# Mutations ---------------------------------------------------------------------------------
def _insert(data: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(len(data) + 1)
    return data[:pos] + rng.randbytes(rng.randint(1, 8)) + data[pos:]


def _delete(data: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(len(data))
    return data[:pos] + data[pos + rng.randint(1, 8):]


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


BYTE_MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "bit_flip": flip, "insert": _insert, "delete": _delete, "truncate": _truncate,
}


def _with_length(pdu: Pdu, length: int) -> bytes:
    return _HEADER.pack(pdu.kind, 0, length & 0xFFFFFFFF) + pdu.body


def _frame(pdus: list[Pdu], rng: random.Random, name: str) -> bytes | None:
    """A framing mutation on the PDU list; None when it does not apply."""
    i = rng.randrange(len(pdus))
    raw = [p.encode() for p in pdus]
    if name == "pdu_length":
        delta = rng.choice([-6, -2, -1, 1, 2, 6, 1000])
        raw[i] = _with_length(pdus[i], len(pdus[i].body) + delta)
    elif name == "huge_length":
        raw[i] = _with_length(pdus[i], rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 1 << 24]))
    elif name == "pdu_type":
        raw[i] = bytes([rng.choice([0, 2, 3, 6, 7, 8, 0x41, 0xFF])]) + raw[i][1:]
    elif name == "reorder":
        j = rng.randrange(len(pdus))
        raw[i], raw[j] = raw[j], raw[i]
    elif name == "drop_pdu":
        del raw[i]
    elif name == "duplicate_pdu":
        raw.insert(i, raw[i])
    elif name == "duplicate_associate_rq":
        raw.insert(rng.randint(1, len(raw)), raw[0])
    elif name == "garbage_after_release":
        raw.append(rng.randbytes(rng.randint(1, 64)))
    else:
        return None
    return b"".join(raw)


def _rq_items(body: bytes) -> list[bytes]:
    items, pos = [], 68
    while pos + 4 <= len(body):
        length = struct.unpack_from(">H", body, pos + 2)[0]
        items.append(body[pos:pos + 4 + length])
        pos += 4 + length
    return items


def _associate(pdus: list[Pdu], rng: random.Random, name: str) -> bytes | None:
    """Mutations of the A-ASSOCIATE-RQ's items (PS3.8 §9.3.2)."""
    rq = pdus[0].body
    items = _rq_items(rq)
    contexts = [k for k, item in enumerate(items) if item[0] == ITEM_PRESENTATION_CONTEXT_RQ]
    k = rng.randrange(len(items))
    if name == "item_length":
        delta = rng.choice([-3, -1, 1, 3, 0x100])
        length = (struct.unpack_from(">H", items[k], 2)[0] + delta) & 0xFFFF
        items[k] = items[k][:2] + struct.pack(">H", length) + items[k][4:]
    elif name == "even_context_id" and contexts:
        c = rng.choice(contexts)
        items[c] = items[c][:4] + bytes([rng.choice([0, 2, 4, 254])]) + items[c][5:]
    elif name == "duplicate_context_id" and contexts:
        c = rng.choice(contexts)
        items.insert(c + 1, items[c])
    elif name == "odd_context_id" and contexts:
        c = rng.choice(contexts)
        items[c] = items[c][:4] + bytes([rng.choice([3, 127, 255])]) + items[c][5:]
    else:
        return None
    first = Pdu(A_ASSOCIATE_RQ, rq[:68] + b"".join(items))
    return b"".join(p.encode() for p in [first, *pdus[1:]])


def _p_data(pdus: list[Pdu], rng: random.Random, name: str) -> bytes | None:
    """Mutations of the DIMSE messages' PDVs (PS3.8 §9.3.5, Annex E)."""
    data_at = [k for k, p in enumerate(pdus) if p.kind == P_DATA_TF]
    if not data_at:
        return None
    out = list(pdus)
    k = rng.choice(data_at)
    items = pdvs(out[k].body)
    if name == "unknown_context_pdv":
        _, control, value = items[0]
        items[0] = (rng.choice([0, 2, 5, 7, 99, 255]), control, value)
    elif name == "pdv_control":
        pcid, control, value = items[0]
        items[0] = (pcid, control ^ rng.choice([1, 2, 3, 0xF0]), value)
    elif name == "command_without_data_set" and len(data_at) > 1:
        del out[data_at[1]]
        return b"".join(p.encode() for p in out)
    elif name == "data_set_without_command" and len(data_at) > 1:
        del out[data_at[0]]
        return b"".join(p.encode() for p in out)
    elif name == "pdv_length":
        pcid, control, value = items[0]
        head = struct.pack(">LBB", len(value) + 2 + rng.choice([-2, -1, 1, 4, 1 << 20]),
                           pcid, control)
        out[k] = Pdu(P_DATA_TF, head + value + b"".join(pdv(*i) for i in items[1:]))
        return b"".join(p.encode() for p in out)
    else:
        return None
    out[k] = Pdu(P_DATA_TF, b"".join(pdv(*i) for i in items))
    return b"".join(p.encode() for p in out)


FRAME_MUTATIONS = ("pdu_length", "huge_length", "pdu_type", "reorder", "drop_pdu",
                   "duplicate_pdu", "duplicate_associate_rq", "garbage_after_release")
ASSOCIATE_MUTATIONS = ("item_length", "even_context_id", "duplicate_context_id",
                       "odd_context_id")
P_DATA_MUTATIONS = ("unknown_context_pdv", "pdv_control", "command_without_data_set",
                    "data_set_without_command", "pdv_length")
DATA_SET_MUTATIONS = ("ds_bit_flip", "ds_truncate", "ds_wrong_vr", "ds_group_length",
                      "ds_other_instance", "refragment")

def reframe(captured: Captured, data_set: bytes, fragments: int) -> bytes:
    """The store stream with ``data_set`` sent in ``fragments`` PDVs (one PDU each)."""
    out: list[bytes] = []
    written = False
    for pdu in captured.pdus:
        items = pdvs(pdu.body) if pdu.kind == P_DATA_TF else []
        if not items or items[0][1] & 1:  # not a data set PDU: as captured
            out.append(pdu.encode())
            continue
        if written:
            continue
        written = True
        size = max(1, -(-len(data_set) // fragments))
        chunks = [data_set[i:i + size] for i in range(0, len(data_set), size)] or [b""]
        for n, chunk in enumerate(chunks):
            control = 0x02 if n == len(chunks) - 1 else 0x00
            out.append(Pdu(P_DATA_TF, pdv(items[0][0], control, chunk)).encode())
    return b"".join(out)


def mutate(captured: Captured, index: int, seed: int) -> tuple[Case, random.Random]:
    """Fuzz case ``index`` of ``seed`` (deterministic); the generator goes on to choose
    how the case is sent."""
    rng = random.Random(f"{seed}:{captured.name}:{index}")
    families = ["byte", "frame", "associate", "p_data"] + (
        ["data_set", "data_set"] if captured.data_set else [])
    family = rng.choice(families)
    data: bytes | None = None
    ds_mutated = False
    pdus = list(captured.pdus)
    if family == "byte":
        name = rng.choice(list(BYTE_MUTATIONS))
        data = BYTE_MUTATIONS[name](b"".join(p.encode() for p in pdus), rng)
    elif family == "frame":
        name = rng.choice(FRAME_MUTATIONS)
        data = _frame(pdus, rng, name)
    elif family == "associate":
        name = rng.choice(ASSOCIATE_MUTATIONS)
        data = _associate(pdus, rng, name)
    elif family == "p_data":
        name = rng.choice(P_DATA_MUTATIONS)
        data = _p_data(pdus, rng, name)
    else:
        name = rng.choice(DATA_SET_MUTATIONS)
        fragments = rng.choice([1, 1, 2, 3, 7])
        mutated = (captured.data_set if name == "refragment"
                   else mutate_data_set(captured.data_set, rng, name))
        ds_mutated = mutated != captured.data_set
        data = reframe(captured, mutated, fragments)
        name = f"{name}/{fragments}"
    if data is None:
        name, data = "none", b"".join(p.encode() for p in pdus)
    return Case(index, captured.name, name, data, ds_mutated), rng
