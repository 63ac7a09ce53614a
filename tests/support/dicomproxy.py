"""A recording TCP proxy between a DICOM sender and the node: what went on the wire.

"Stored byte-identical to what was sent" needs the bytes that were *sent*, which are
not always the sender's file: DCMTK's storescu drops group lengths and converts transfer
syntaxes, Orthanc and PixelMed re-encode. :class:`RecordingProxy` forwards every byte
unchanged in both directions and parses a copy of each stream on its own (struct and
pydicom only, none of qcnode's Upper Layer code, so the check is independent of the code
under test):

* requestor → acceptor: A-ASSOCIATE-RQ (calling AE, proposed contexts, Maximum Length),
  every P-DATA-TF PDU's length, and each C-STORE-RQ's data set as the concatenation of
  its data PDVs (PS3.8 §9.3.5, Annex E) — the data set exactly as the sender encoded it;
* acceptor → requestor: A-ASSOCIATE-AC (the accepted transfer syntax per presentation
  context, §9.3.3) and each C-STORE-RSP's status, with the time from the data set's last
  fragment to its response.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, P_DATA_TF = 0x01, 0x02, 0x04
ITEM_CONTEXT_RQ, ITEM_CONTEXT_AC = 0x20, 0x21
ITEM_ABSTRACT, ITEM_TRANSFER, ITEM_USER_INFO, ITEM_MAX_LENGTH = 0x30, 0x40, 0x50, 0x51
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
PDV_COMMAND, PDV_LAST = 0x01, 0x02
RESPONSE_BIT = 0x8000  # PS3.7 §9.3, §10.3: a response's Command Field
PENDING = frozenset({0xFF00, 0xFF01})  # PS3.7 Annex C.4: more responses follow


@dataclass
class SentDataSet:
    """One C-STORE data set as it crossed the wire."""

    sop_instance_uid: str
    sop_class_uid: str
    context_id: int
    data: bytes
    transfer_syntax: str = ""  # the context's accepted syntax (from the AC)
    status: int | None = None  # the C-STORE-RSP status, None while unanswered
    sent_at: float = 0.0  # monotonic time of the data set's last fragment
    answer_seconds: float | None = None


@dataclass
class Association:
    """What the proxy saw of one connection."""

    calling_ae: str = ""
    called_ae: str = ""
    proposed: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    requestor_max_pdu: int = -1
    accepted: dict[int, str] = field(default_factory=dict)  # context id -> syntax
    acceptor_max_pdu: int = -1
    pdata_lengths: list[int] = field(default_factory=list)  # requestor's P-DATA-TF PDUs
    stores: list[SentDataSet] = field(default_factory=list)
    by_message: dict[int, SentDataSet] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # what the proxy could not parse
    #: every DIMSE command in wire order: (from the requestor?, Command Field, Status
    #: or None for a request)
    commands: list[tuple[bool, int, int | None]] = field(default_factory=list)

    def most_outstanding(self) -> int:
        """The most requests the requestor had waiting for their final response at once
        (1: one operation at a time, PS3.7 §D.3.3.3's default window)."""
        outstanding = most = 0
        for from_requestor, command, status in self.commands:
            if from_requestor and not command & RESPONSE_BIT:
                outstanding += 1
                most = max(most, outstanding)
            elif command & RESPONSE_BIT and status not in PENDING:
                outstanding -= 1
        return most


def _items(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, value) of the variable items of an A-ASSOCIATE PDU body (PS3.8 §9.3.2)."""
    pos = 0
    while pos + 4 <= len(body):
        kind, length = body[pos], struct.unpack(">H", body[pos + 2:pos + 4])[0]
        yield kind, body[pos + 4:pos + 4 + length]
        pos += 4 + length


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def _max_length(user_info: bytes) -> int:
    for kind, value in _items(user_info):
        if kind == ITEM_MAX_LENGTH:
            return int(struct.unpack(">I", value)[0])
    return -1


def _command(raw: bytes) -> Dataset:
    """A command set (always Implicit VR Little Endian, PS3.7 §6.3.1)."""
    return read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


class _Stream:
    """Reassembles PDUs of one direction and hands them to the association's record."""

    def __init__(self, record: Association, lock: threading.Lock, requestor: bool) -> None:
        self.record, self.lock, self.requestor = record, lock, requestor
        self.buffer = bytearray()
        self.fragments: dict[tuple[int, bool], bytearray] = {}
        self.commands: dict[int, Dataset] = {}  # context id -> C-STORE-RQ awaiting data
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self.buffer += data
        try:
            self._split()
        except (ValueError, KeyError, AttributeError, StopIteration, IndexError) as exc:
            self.broken = True  # keep forwarding; the record says why it stopped parsing
            self.record.errors.append(f"{type(exc).__name__}: {exc}")

    def _split(self) -> None:
        while len(self.buffer) >= 6:
            kind, length = self.buffer[0], struct.unpack(">I", self.buffer[2:6])[0]
            if len(self.buffer) < 6 + length:
                return
            body = bytes(self.buffer[6:6 + length])
            del self.buffer[:6 + length]
            with self.lock:
                self._pdu(kind, body)

    def _pdu(self, kind: int, body: bytes) -> None:
        rec = self.record
        if kind == A_ASSOCIATE_RQ and self.requestor:
            rec.called_ae, rec.calling_ae = _uid(body[4:20]), _uid(body[20:36])
            for item, value in _items(body[68:]):
                if item == ITEM_CONTEXT_RQ:
                    subs = list(_items(value[4:]))
                    abstract = next(_uid(v) for k, v in subs if k == ITEM_ABSTRACT)
                    syntaxes = tuple(_uid(v) for k, v in subs if k == ITEM_TRANSFER)
                    rec.proposed[value[0]] = (abstract, syntaxes)
                elif item == ITEM_USER_INFO:
                    rec.requestor_max_pdu = _max_length(value)
        elif kind == A_ASSOCIATE_AC and not self.requestor:
            for item, value in _items(body[68:]):
                if item == ITEM_CONTEXT_AC and value[2] == 0:  # result: acceptance
                    rec.accepted[value[0]] = next(
                        _uid(v) for k, v in _items(value[4:]) if k == ITEM_TRANSFER)
                elif item == ITEM_USER_INFO:
                    rec.acceptor_max_pdu = _max_length(value)
        elif kind == P_DATA_TF:
            if self.requestor:
                rec.pdata_lengths.append(len(body))
            self._pdvs(body)

    def _pdvs(self, body: bytes) -> None:
        pos = 0
        while pos + 6 <= len(body):
            length = struct.unpack(">I", body[pos:pos + 4])[0]
            pcid, control = body[pos + 4], body[pos + 5]
            value = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            key = (pcid, bool(control & PDV_COMMAND))
            self.fragments.setdefault(key, bytearray()).extend(value)
            if control & PDV_LAST:
                self._message(pcid, key[1], bytes(self.fragments.pop(key)))

    def _message(self, pcid: int, is_command: bool, raw: bytes) -> None:
        rec = self.record
        if is_command:
            cmd = _command(raw)
            field_ = int(cmd.CommandField)
            rec.commands.append((self.requestor, field_,
                                 int(cmd.Status) if "Status" in cmd else None))
            if self.requestor and field_ == C_STORE_RQ:
                self.commands[pcid] = cmd
            elif not self.requestor and field_ == C_STORE_RSP:
                sent = rec.by_message.get(int(cmd.MessageIDBeingRespondedTo))
                if sent is not None:
                    sent.status = int(cmd.Status)
                    sent.answer_seconds = time.monotonic() - sent.sent_at
            return
        if pcid not in self.commands or not self.requestor:
            return
        cmd = self.commands.pop(pcid)
        sent = SentDataSet(str(cmd.AffectedSOPInstanceUID), str(cmd.AffectedSOPClassUID),
                           pcid, raw, rec.accepted.get(pcid, ""), sent_at=time.monotonic())
        rec.stores.append(sent)
        rec.by_message[int(cmd.MessageID)] = sent


class RecordingProxy:
    """Listen on 127.0.0.1:``port`` (free), forward to 127.0.0.1:``target``, record.

    Use as a context manager; :attr:`associations` holds one record per connection.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.associations: list[Association] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closing = False

    def __enter__(self) -> RecordingProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        for sock in self._sockets:
            sock.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)  # to see ``_closing`` (close() wakes no accept())
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            record = Association()
            with self._lock:
                self.associations.append(record)
            self._spawn(self._pump, client, server, _Stream(record, self._lock, True))
            self._spawn(self._pump, server, client, _Stream(record, self._lock, False))

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, stream: _Stream) -> None:
        """Forward ``src`` → ``dst`` unchanged, parsing a copy; half-close at the end."""
        try:
            while data := src.recv(1 << 20):
                stream.feed(data)  # first: a response is never parsed before its request
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    # Results ------------------------------------------------------------------------------
    def sent(self) -> dict[str, SentDataSet]:
        """Every C-STORE data set seen, by SOP Instance UID (the last one if repeated)."""
        with self._lock:
            return {s.sop_instance_uid: s for a in self.associations for s in a.stores}

    def answered(self) -> bool:
        """True once every data set seen has its C-STORE-RSP."""
        with self._lock:
            return all(s.status is not None for a in self.associations for s in a.stores)
