"""A lean DICOM acceptor: one thread per connection, data sets streamed to files.

Why not pynetdicom here: its acceptor decodes every PDU into primitives, passes them
through a DUL thread, a state machine, queues and a second reactor thread (several
thread hand-offs and ~4 ms of CPU per 512×512 image on the benchmark machine, more than
the rest of the receive path). Here one thread per association reads the socket and
passes each P-DATA-TF data fragment straight from a reused buffer to the sink the node
gives it, the receive journal (:mod:`node.journal`; PS3.8 §9.3.5, §E.2). pynetdicom
still does all of qcnode's sending (:mod:`node.scu`).

State handling follows PS3.8 §9.2 for an acceptor: A-ASSOCIATE-RQ must arrive within
the ACSE timeout (ARTIM) or the connection is closed; an established association that
stays silent longer than the network timeout, sends an unexpected or malformed PDU, or
references an unaccepted presentation context is aborted (A-ABORT, source service
provider); A-RELEASE-RQ is answered A-RELEASE-RP and the connection closed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from node import dimse
from node import upperlayer as ul
from node.logs import get_logger

log = get_logger(__name__)

#: Receive buffer, reused for every read of one connection.
BUFFER_BYTES = 256 << 10
#: An A-ASSOCIATE-RQ longer than this is refused (every storage context fits in ~20 KB).
MAX_ASSOCIATE_RQ = 1 << 20


@dataclass(frozen=True)
class Peer:
    """One association's identity (for logs and the ledger)."""

    assoc_id: str
    calling_ae: str
    address: str


class Incoming(Protocol):
    """Where a data set's bytes go while it arrives (the node's receive journal)."""

    size: int
    error: bool  # a write failed (disk full): the data set is read on, then refused

    def write(self, data: memoryview) -> None: ...
    def discard(self) -> None: ...


@dataclass(frozen=True)
class StoreRequest:
    """A received C-STORE data set, as a Part 10 byte stream (PS3.7 §9.3.1, PS3.10)."""

    incoming: Incoming
    abstract_syntax: str
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str


class Services(Protocol):
    """What the acceptor asks of the node (implemented by :class:`node.scp.Listener`)."""

    def admits(self, calling_ae: str, address: str) -> bool: ...
    def opened(self, peer: Peer) -> None: ...
    def closed(self, peer: Peer, *, aborted: bool) -> None: ...
    def echo(self, peer: Peer) -> int: ...
    def incoming(self, peer: Peer, part10_header: bytes) -> Incoming: ...
    def store(self, peer: Peer, request: StoreRequest) -> int: ...
    def error_comment(self, status: int) -> str | None: ...


@dataclass(frozen=True)
class AcceptorConfig:
    """Limits and identity of the acceptor (from ``[node]``)."""

    ae_title: str
    max_pdu: int
    acse_timeout: float
    network_timeout: float
    supported: dict[str, tuple[str, ...]]
    implementation_uid: str
    implementation_version: str


class Aborted(Exception):
    """The association ends without release (peer abort, EOF, timeout, protocol error)."""


class _Reader:
    """Reads from a socket through one reused buffer, as much per call as has arrived.

    PDU and PDV headers are taken from the buffer and data set bytes are passed on as
    views of it: one ``recv`` per buffer-full, instead of three or more per P-DATA-TF
    PDU when each header is read on its own. Every system call releases and retakes
    the GIL, which many concurrent associations contend for.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(BUFFER_BYTES)
        self.view = memoryview(self.buf)
        self.start = 0  # the first byte not yet consumed
        self.end = 0  # the end of what was received

    def _fill(self) -> None:
        """Receive into the (consumed, so empty) buffer."""
        try:
            n = self.sock.recv_into(self.view)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired (see set_timeout)
            raise Aborted("nothing received within the timeout") from exc
        if n == 0:
            raise Aborted("connection closed by the peer")
        self.start, self.end = 0, n

    def exact(self, count: int) -> bytes:
        """Exactly ``count`` bytes (headers, commands, association requests)."""
        if self.end - self.start >= count:
            data = bytes(self.view[self.start:self.start + count])
            self.start += count
            return data
        chunks = []
        while count > 0:
            if self.start == self.end:
                self._fill()
            take = min(count, self.end - self.start)
            chunks.append(bytes(self.view[self.start:self.start + take]))
            self.start += take
            count -= take
        return b"".join(chunks)

    def stream(self, count: int, sink: Callable[[memoryview], None]) -> None:
        """Pass ``count`` bytes to ``sink`` as views of the buffer (valid during the
        call only), without copying."""
        while count > 0:
            if self.start == self.end:
                self._fill()
            take = min(count, self.end - self.start)
            sink(self.view[self.start:self.start + take])
            self.start += take
            count -= take


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking reads and writes that fail after ``seconds`` (0: never).

    The kernel's SO_RCVTIMEO / SO_SNDTIMEO rather than ``socket.settimeout``: with a
    Python-level timeout every ``recv`` is preceded by a ``poll`` (two system calls,
    two GIL hand-offs); here an expired timeout surfaces as :class:`BlockingIOError`.
    """
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class Connection:
    """One association, from A-ASSOCIATE-RQ to release or abort (PS3.8 §9.2)."""

    def __init__(
        self, sock: socket.socket, address: str, config: AcceptorConfig, services: Services,
        over_limit: bool,
    ) -> None:
        self.sock, self.address, self.config = sock, address, config
        self.services, self.over_limit = services, over_limit
        self.reader: _Reader
        self.contexts: dict[int, ul.Accepted] = {}
        self.peer_max_pdu = 0
        self.incoming: Incoming | None = None
        self._pending: tuple[int, dimse.Command] | None = None

    # Association establishment --------------------------------------------------------
    def run(self) -> None:
        """Serve the connection until it ends; never raises."""
        peer: Peer | None = None
        aborted = True
        try:
            self.reader = _Reader(self.sock)
            set_timeout(self.sock, self.config.acse_timeout)
            peer = self._establish()
            if peer is None:
                return
            set_timeout(self.sock, self.config.network_timeout)
            aborted = not self._serve(peer)
        except (ul.ProtocolError, dimse.CommandError) as exc:
            # Malformed or unexpected PDUs, before or after establishment: AA-1/AA-8.
            reason = exc.reason if isinstance(exc, ul.ProtocolError) else (
                ul.ABORT_REASON_NOT_SPECIFIED)
            log.warning("association aborted", reason=type(exc).__name__, detail=str(exc),
                        address=self.address)
            self._send_quietly(ul.abort(reason))
        except (Aborted, OSError) as exc:
            if peer is not None:
                log.info("association aborted", reason=type(exc).__name__)
                self._send_quietly(ul.abort(ul.ABORT_REASON_NOT_SPECIFIED))
        except Exception:  # a bug must end this association only, never the listener
            log.exception("association failed")
            self._send_quietly(ul.abort(ul.ABORT_REASON_NOT_SPECIFIED))
        finally:
            if self.incoming is not None:
                self.incoming.discard()
            with contextlib.suppress(OSError):
                self.sock.close()
            if peer is not None:
                self.services.closed(peer, aborted=aborted)

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _establish(self) -> Peer | None:
        pdu_type, length = ul.pdu_header(self.reader.exact(6))
        if pdu_type != ul.A_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"PDU type {pdu_type} before A-ASSOCIATE-RQ",
                                   ul.ABORT_UNEXPECTED_PDU)
        if length > MAX_ASSOCIATE_RQ:
            raise ul.ProtocolError("A-ASSOCIATE-RQ too long", ul.ABORT_INVALID_PDU_PARAMETER)
        request = ul.parse_associate_rq(self.reader.exact(length))
        reject = self._rejection(request)
        if reject is not None:
            self._send_quietly(ul.associate_rj(*reject))
            return None
        results = ul.negotiate(request, self.config.supported)
        self.contexts = {
            pcid: ul.Accepted(request.contexts[pcid][0], ts)
            for pcid, (result, ts) in results.items() if result == ul.PC_ACCEPTANCE
        }
        self.peer_max_pdu = request.max_pdu
        self.sock.sendall(ul.associate_ac(
            request, results, max_pdu=self.config.max_pdu,
            implementation_uid=self.config.implementation_uid,
            implementation_version=self.config.implementation_version,
        ))
        peer = Peer(uuid.uuid4().hex[:16], request.calling_ae, self.address)
        self.services.opened(peer)
        return peer

    def _rejection(self, request: ul.AssociateRequest) -> tuple[int, int, int] | None:
        """(result, source, reason) of an A-ASSOCIATE-RJ, or None to accept (§9.3.4)."""
        if not request.protocol_version & ul.PROTOCOL_VERSION:
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_PROVIDER_ACSE,
                    ul.RJ_PROTOCOL_VERSION_NOT_SUPPORTED)
        if request.application_context != ul.APPLICATION_CONTEXT:
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                    ul.RJ_APPLICATION_CONTEXT_NOT_SUPPORTED)
        if request.called_ae != self.config.ae_title:
            log.warning("association rejected", reason="called AE not ours",
                        calling_ae=request.calling_ae, address=self.address)
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                    ul.RJ_CALLED_AE_NOT_RECOGNISED)
        if not self.services.admits(request.calling_ae, self.address):
            log.warning("association rejected", reason="calling AE/host not allowed",
                        calling_ae=request.calling_ae, address=self.address)
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                    ul.RJ_CALLING_AE_NOT_RECOGNISED)
        if self.over_limit:
            log.warning("association rejected", reason="association limit",
                        calling_ae=request.calling_ae, address=self.address)
            return (ul.RJ_REJECTED_TRANSIENT, ul.RJ_SOURCE_SERVICE_PROVIDER_PRESENTATION,
                    ul.RJ_LOCAL_LIMIT_EXCEEDED)
        return None

    # Data transfer ----------------------------------------------------------------------
    def _serve(self, peer: Peer) -> bool:
        """Handle PDUs until release (True) or abort by the peer (False)."""
        command = bytearray()
        while True:
            pdu_type, length = ul.pdu_header(self.reader.exact(6))
            if pdu_type == ul.P_DATA_TF:
                if self.config.max_pdu and length > self.config.max_pdu:
                    # Longer than the Maximum Length we announced (PS3.8 §D.1).
                    raise ul.ProtocolError("P-DATA-TF longer than our maximum length",
                                           ul.ABORT_INVALID_PDU_PARAMETER)
                self._p_data(peer, length, command)
            elif pdu_type in (ul.A_RELEASE_RQ, ul.A_ABORT):
                if length != ul.FIXED_PDU_LENGTH:  # PS3.8 §9.3.6, §9.3.8: always 4
                    raise ul.ProtocolError("A-RELEASE-RQ / A-ABORT length is not 4",
                                           ul.ABORT_INVALID_PDU_PARAMETER)
                self.reader.exact(length)
                if pdu_type == ul.A_ABORT:
                    return False
                self.sock.sendall(ul.release_rp())
                return True
            elif pdu_type in (ul.A_ASSOCIATE_RQ, ul.A_ASSOCIATE_AC, ul.A_ASSOCIATE_RJ,
                              ul.A_RELEASE_RP):
                raise ul.ProtocolError(f"unexpected PDU type {pdu_type}", ul.ABORT_UNEXPECTED_PDU)
            else:
                raise ul.ProtocolError(f"unrecognised PDU type {pdu_type}",
                                       ul.ABORT_UNRECOGNIZED_PDU)

    def _p_data(self, peer: Peer, length: int, command: bytearray) -> None:
        """Walk the PDVs of one P-DATA-TF PDU (PS3.8 §9.3.5, Annex E)."""
        while length > 0:
            if length < 6:
                raise ul.ProtocolError("PDV header runs past the PDU")
            head = self.reader.exact(6)
            pdv_len = int.from_bytes(head[:4], "big")
            pcid, control = head[4], head[5]
            if pdv_len < 2 or pdv_len + 4 > length or pcid not in self.contexts:
                raise ul.ProtocolError("malformed PDV or unaccepted presentation context")
            length -= 4 + pdv_len
            value_len = pdv_len - 2
            last = bool(control & 0x02)
            if control & 0x01:
                command += self.reader.exact(value_len)
                if len(command) > dimse.MAX_COMMAND_BYTES:
                    raise dimse.CommandError("command set too long")
                if last:
                    self._command(peer, pcid, bytes(command))
                    command.clear()
            else:
                self._data(peer, pcid, value_len, last)

    def _command(self, peer: Peer, pcid: int, raw: bytes) -> None:
        request = dimse.decode_command(raw)
        if self.incoming is not None or self._pending is not None:
            raise ul.ProtocolError("a new command before the previous data set ended")
        if request.field == dimse.C_ECHO_RQ and not request.has_data_set:
            self._respond(pcid, request, self.services.echo(peer))
        elif request.field == dimse.C_STORE_RQ and request.has_data_set:
            context = self.contexts[pcid]
            self._pending = (pcid, request)
            self.incoming = self.services.incoming(
                peer,
                dimse.part10_header(
                    request.sop_class_uid, request.sop_instance_uid, context.transfer_syntax,
                    implementation_uid=self.config.implementation_uid,
                    implementation_version=self.config.implementation_version,
                    source_ae=peer.calling_ae,
                ),
            )
        else:
            raise ul.ProtocolError(f"unsupported DIMSE command 0x{request.field:04X}")

    def _data(self, peer: Peer, pcid: int, value_len: int, last: bool) -> None:
        incoming, pending = self.incoming, self._pending
        if incoming is None or pending is None or pending[0] != pcid:
            raise ul.ProtocolError("data set fragment without its C-STORE command")
        self.reader.stream(value_len, incoming.write)
        if not last:
            return
        self.incoming, self._pending = None, None
        context = self.contexts[pcid]
        request = pending[1]
        status = self.services.store(peer, StoreRequest(
            incoming=incoming, abstract_syntax=context.abstract_syntax,
            transfer_syntax=context.transfer_syntax, sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
        ))
        self._respond(pcid, request, status)

    def _respond(self, pcid: int, request: dimse.Command, status: int) -> None:
        message = dimse.response(request, status, self.services.error_comment(status))
        pdus = ul.p_data(pcid, message, command=True, max_pdu=self.peer_max_pdu)
        self.sock.sendall(b"".join(pdus))
