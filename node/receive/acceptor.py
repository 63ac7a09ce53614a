"""A lean DICOM acceptor: every connection in one event loop, data sets streamed to files.

Why not pynetdicom here: its acceptor decodes every PDU into primitives, passes them
through a DUL thread, a state machine, queues and a second reactor thread (several
thread hand-offs and ~4 ms of CPU per 512×512 image on the benchmark machine, more than
the rest of the receive path). Here one thread serves every association (an event loop,
:mod:`node.receive.acceptor_server`) and passes each P-DATA-TF data fragment straight from the
connection's reused buffer to the sink the node gives it, the receive journal
(:mod:`node.store.journal`; PS3.8 §9.3.5, §E.2); the calls that wait for a disk or the
ledger run in a few pool threads meanwhile. pynetdicom still does all of qcnode's
sending (:mod:`node.send.scu`). Besides C-ECHO and C-STORE it takes N-EVENT-REPORT, whose
small data set (a Storage Commitment report, PS3.4 J.3.3) is collected in memory and
handed to the node whole (:class:`EventReport`); which callers may use which SOP
classes is the node's answer to :meth:`Services.admits`.

State handling follows PS3.8 §9.2 for an acceptor: the whole A-ASSOCIATE-RQ must
arrive within the ACSE timeout (ARTIM) counted from the connection's accept — not
re-armed by each byte: a peer dribbling one byte a second held its socket for as long
as it liked — or the connection is closed; an established association that
stays silent longer than the network timeout, sends an unexpected or malformed PDU, or
references an unaccepted presentation context is aborted (A-ABORT, source service
provider); A-RELEASE-RQ is answered A-RELEASE-RP and the connection closed.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import socket
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, TypeVar

from node import metrics
from node.logs import get_logger
from node.receive import dimse
from node.receive import upperlayer as ul
from node.receive.negotiation import Negotiator, Request, reject
from node.redact import error_text

log = get_logger(__name__)

#: A-ASSOCIATE-RJ (source, reason) → the ``reason`` label of a rejection (PS3.8 §9.3.4).
_RJ_REASONS = {
    (ul.RJ_SOURCE_SERVICE_PROVIDER_ACSE, ul.RJ_PROTOCOL_VERSION_NOT_SUPPORTED):
        "protocol_version",
    (ul.RJ_SOURCE_SERVICE_USER, ul.RJ_APPLICATION_CONTEXT_NOT_SUPPORTED):
        "application_context",
    (ul.RJ_SOURCE_SERVICE_USER, ul.RJ_CALLED_AE_NOT_RECOGNISED): "called_ae",
    (ul.RJ_SOURCE_SERVICE_USER, ul.RJ_CALLING_AE_NOT_RECOGNISED): "calling_ae_or_host",
    (ul.RJ_SOURCE_SERVICE_PROVIDER_PRESENTATION, ul.RJ_LOCAL_LIMIT_EXCEEDED):
        "association_limit",
}

#: Receive buffer, reused for every read of one connection.
BUFFER_BYTES = 256 << 10
#: An A-ASSOCIATE-RQ longer than this is refused (every storage context fits in ~20 KB).
MAX_ASSOCIATE_RQ = 1 << 20
#: A peer that leaves this much of our responses unread is aborted.
MAX_OUTBOX = 1 << 20
#: An N-EVENT-REPORT's Event Information longer than this aborts the association (a
#: storage commitment report of 10,000 objects is ~1.5 MB).
MAX_EVENT_INFORMATION = 16 << 20


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


@dataclass(frozen=True)
class EventReport:
    """A received N-EVENT-REPORT (PS3.7 §10.1.1): its command and Event Information."""

    abstract_syntax: str
    transfer_syntax: str
    command: dimse.Command
    data: bytes


class Services(Protocol):
    """What the acceptor asks of the node (implemented by :class:`node.receive.scp.Listener`)."""

    def admits(self, calling_ae: str, address: str) -> Mapping[str, tuple[str, ...]] | None:
        """The abstract syntaxes this caller may use, with our transfer syntaxes in
        preference order; None rejects it."""
        ...

    def known_host(self, address: str) -> bool: ...
    def opened(self, peer: Peer) -> None: ...
    def closed(self, peer: Peer, *, aborted: bool) -> None: ...
    def echo(self, peer: Peer) -> int: ...
    def incoming(self, peer: Peer, part10_header: bytes) -> Incoming: ...
    def store(self, peer: Peer, request: StoreRequest) -> int: ...
    def event_report(self, peer: Peer, report: EventReport) -> int: ...
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
    #: abstract syntax → our SCP/SCU role answer (:class:`node.receive.negotiation.Negotiator`)
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)

    @cached_property
    def negotiator(self) -> Negotiator:
        """The supported contexts as pynetdicom's, built once for every association."""
        return self.negotiator_for(self.supported)

    @cached_property
    def _negotiators(self) -> dict[frozenset[str], Negotiator]:
        return {}

    def negotiator_for(self, supported: Mapping[str, tuple[str, ...]]) -> Negotiator:
        """The negotiator for one caller's abstract syntaxes (a storage sender's, a
        destination's commitment reports): built once per set, then reused."""
        key = frozenset(supported)
        found = self._negotiators.get(key)
        if found is None:
            found = Negotiator(supported, self.roles, max_pdu=self.max_pdu,
                               implementation_uid=self.implementation_uid,
                               implementation_version=self.implementation_version)
            self._negotiators[key] = found
        return found


class Offload(Protocol):
    """Runs a connection's blocking calls (a durable journal commit, a ledger row) off
    the event loop and resumes the connection when they are done."""

    def submit(self, conn: Connection, call: Callable[[], Any]) -> Future[Any]: ...


T = TypeVar("T")


class Aborted(Exception):
    """The association ends without release (peer abort, EOF, timeout, protocol error)."""


#: What the protocol coroutine yields: it waits for more bytes from the peer.
Wait = Generator[None, None, None]


class Connection:
    """One association, from A-ASSOCIATE-RQ to release or abort (PS3.8 §9.2).

    The protocol is a generator (:meth:`_protocol`) that the server's event loop
    (:class:`node.receive.acceptor_server.AcceptorServer`) resumes whenever bytes arrived: it
    consumes them from one reused buffer — PDU and PDV headers parsed in place, data
    set bytes passed on as views of the buffer — and yields when it needs more. One
    thread serves every connection: no thread per association and no hand-offs of the
    GIL between twenty receiving threads (with 20 senders on a 2-core machine, context
    switches and wake-ups were a third of the listener's CPU).

    The loop calls :meth:`received` after each ``recv`` into :attr:`view`,
    :meth:`expire` when :attr:`deadline` passed and :meth:`flush` when the socket can
    take the rest of :attr:`outbox`. The connection's log lines carry its own context
    (calling AE, association id, series) whichever connection the thread served last.
    """

    def __init__(
        self, sock: socket.socket, address: str, config: AcceptorConfig, services: Services,
        over_limit: Callable[[], bool], offload: Offload,
    ) -> None:
        self.sock, self.address, self.config = sock, address, config
        self.services, self.over_limit, self.offload = services, over_limit, offload
        self.fd = sock.fileno()
        self.busy = False  # a call runs off the loop: do not read, do not time out
        self._failure: OSError | None = None  # a send failed while busy
        self.events = 0  # what the event loop watches the socket for
        self.view = memoryview(bytearray(BUFFER_BYTES))
        self.start = 0  # the first byte not yet consumed
        self.end = 0  # the end of what was received
        self.outbox = bytearray()  # bytes the socket did not take yet
        self.timeout = config.acse_timeout
        self.deadline = time.monotonic() + self.timeout
        self.done = False
        #: the A-ASSOCIATE-RQ passed the limits: this connection holds an association slot
        self.established = False
        self.contexts: dict[int, ul.Accepted] = {}
        self.peer_max_pdu = 0
        self.incoming: Incoming | None = None
        self._event_data: bytearray | None = None  # an N-EVENT-REPORT's data set
        self._pending: tuple[int, dimse.Command] | None = None
        self.context = contextvars.Context()
        self._gen = self._protocol()
        self._resume(None)

    # Driven by the event loop -----------------------------------------------------------
    def received(self, count: int) -> None:
        """``count`` bytes were received into :attr:`view` (0: the peer closed)."""
        if count == 0:
            self._resume(Aborted("connection closed by the peer"))
            return
        self.start, self.end = 0, count
        if self.established:  # ARTIM runs from the accept, not from the last byte
            self.deadline = time.monotonic() + self.timeout
        self._resume(None)

    def failed(self, exc: OSError) -> None:
        """Receiving or sending failed (connection reset)."""
        if self.busy:  # delivered when the call returns
            self._failure = exc
            return
        self._resume(exc)

    def resume(self) -> None:
        """The call :meth:`_off_loop` waits for is done."""
        self._resume(None)

    def expire(self) -> None:
        """Nothing arrived before :attr:`deadline` (ARTIM / network timeout)."""
        self._resume(Aborted("nothing received within the timeout"))

    def flush(self) -> None:
        """Send what :attr:`outbox` holds, as far as the socket takes it."""
        try:
            sent = self.sock.send(self.outbox)
        except BlockingIOError:
            return
        except OSError as exc:
            self.failed(exc)
            return
        del self.outbox[:sent]

    def _resume(self, exc: BaseException | None) -> None:
        if self.done:
            return
        try:
            if exc is None:
                self.context.run(next, self._gen)
            else:
                self.context.run(self._gen.throw, exc)
        except StopIteration:
            self.done = True

    # Reading and sending (inside the coroutine) -------------------------------------------
    def _exact(self, count: int) -> Generator[None, None, bytes]:
        """Exactly ``count`` bytes (headers, commands, association requests)."""
        if self.end - self.start >= count:
            data = bytes(self.view[self.start:self.start + count])
            self.start += count
            return data
        chunks = []
        while count > 0:
            while self.start == self.end:
                yield
            take = min(count, self.end - self.start)
            chunks.append(bytes(self.view[self.start:self.start + take]))
            self.start += take
            count -= take
        return b"".join(chunks)

    def _stream(self, count: int, sink: Callable[[memoryview], None]) -> Wait:
        """Pass ``count`` bytes to ``sink`` as views of the buffer (valid during the
        call only), without copying."""
        while count > 0:
            while self.start == self.end:
                yield
            take = min(count, self.end - self.start)
            sink(self.view[self.start:self.start + take])
            self.start += take
            count -= take

    def _off_loop(self, call: Callable[[], T]) -> Generator[None, None, T]:
        """``call()``, run by :attr:`offload` while the loop serves the others; the
        socket is not read and the connection does not time out meanwhile (the node is
        busy, not the peer). The call runs in a copy of the connection's context (the
        loop thread is inside the original right now) and what it binds there (log
        context) is set in the connection's context when it returns."""
        self.busy = True
        self.deadline = math.inf
        copy = contextvars.copy_context()
        future = self.offload.submit(self, lambda: (copy.run(call), copy))
        while not future.done():
            yield
        self.busy = False
        self.deadline = time.monotonic() + self.timeout
        if self._failure is not None:
            raise self._failure
        result: T
        result, changed = future.result()
        for var, value in changed.items():
            var.set(value)
        return result

    def _send(self, data: bytes) -> None:
        """Send ``data`` now, or as soon as the socket takes it (:meth:`flush`)."""
        if not self.outbox:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.outbox += data
        if len(self.outbox) > MAX_OUTBOX:
            raise Aborted("the peer does not read what it is sent")

    # Association establishment --------------------------------------------------------
    def _protocol(self) -> Wait:
        """Serve the connection until it ends; never raises."""
        peer: Peer | None = None
        aborted = True
        try:
            peer = yield from self._establish()
            if peer is None:
                return
            self.timeout = self.config.network_timeout
            self.deadline = time.monotonic() + self.timeout
            aborted = not (yield from self._serve(peer))
        except (ul.ProtocolError, dimse.CommandError) as exc:
            # Malformed or unexpected PDUs, before or after establishment: AA-1/AA-8.
            reason = exc.reason if isinstance(exc, ul.ProtocolError) else (
                ul.ABORT_REASON_NOT_SPECIFIED)
            log.warning("association aborted", reason=type(exc).__name__, detail=error_text(exc),
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
        """Send a last PDU (A-ASSOCIATE-RJ, A-ABORT) before closing, if the socket
        takes it at once."""
        with contextlib.suppress(OSError, Aborted):
            self._send(data)

    def _establish(self) -> Generator[None, None, Peer | None]:
        """Negotiate the association (:mod:`node.receive.negotiation`); None when rejected."""
        header = yield from self._exact(6)
        pdu_type, length = ul.pdu_header(header)
        if pdu_type != ul.A_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"PDU type {pdu_type} before A-ASSOCIATE-RQ",
                                   ul.ABORT_UNEXPECTED_PDU)
        if length > MAX_ASSOCIATE_RQ:
            raise ul.ProtocolError("A-ASSOCIATE-RQ too long", ul.ABORT_INVALID_PDU_PARAMETER)
        raw = header + (yield from self._exact(length))
        # pynetdicom decodes and negotiates: ~1 ms for a modality's request, more for a
        # long one — off the loop, which serves the other associations meanwhile.
        negotiator = self.config.negotiator
        request = yield from self._off_loop(lambda: negotiator.decode(raw))
        rejection, supported = self._rejection(request)
        if rejection is not None:
            metrics.rejected(request.calling_ae, self.address,
                             _RJ_REASONS.get((rejection[1], rejection[2]), "other"))
            self._send_quietly(reject(*rejection))
            return None
        self.established = True  # the slot is ours from the limit check on
        chosen = self.config.negotiator_for(supported)
        answer, self.contexts = yield from self._off_loop(lambda: chosen.accept(request))
        self.peer_max_pdu = request.max_pdu
        self._send(answer)
        peer = Peer(uuid.uuid4().hex[:16], request.calling_ae, self.address)
        metrics.accepted()
        yield from self._off_loop(lambda: self.services.opened(peer))
        return peer

    def _rejection(
        self, request: Request,
    ) -> tuple[tuple[int, int, int] | None, Mapping[str, tuple[str, ...]]]:
        """(result, source, reason) of an A-ASSOCIATE-RJ, or None to accept (§9.3.4), and
        the abstract syntaxes the caller may use."""
        if not request.protocol_version & ul.PROTOCOL_VERSION:
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_PROVIDER_ACSE,
                    ul.RJ_PROTOCOL_VERSION_NOT_SUPPORTED), {}
        if request.application_context != ul.APPLICATION_CONTEXT:
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                    ul.RJ_APPLICATION_CONTEXT_NOT_SUPPORTED), {}
        if request.called_ae != self.config.ae_title:
            log.warning("association rejected", reason="called AE not ours",
                        calling_ae=request.calling_ae, address=self.address)
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                    ul.RJ_CALLED_AE_NOT_RECOGNISED), {}
        supported = self.services.admits(request.calling_ae, self.address)
        if supported is None:
            log.warning("association rejected", reason="calling AE/host not allowed",
                        calling_ae=request.calling_ae, address=self.address)
            return (ul.RJ_REJECTED_PERMANENT, ul.RJ_SOURCE_SERVICE_USER,
                    ul.RJ_CALLING_AE_NOT_RECOGNISED), {}
        if self.over_limit():
            log.warning("association rejected", reason="association limit",
                        calling_ae=request.calling_ae, address=self.address)
            return (ul.RJ_REJECTED_TRANSIENT, ul.RJ_SOURCE_SERVICE_PROVIDER_PRESENTATION,
                    ul.RJ_LOCAL_LIMIT_EXCEEDED), {}
        return None, supported

    # Data transfer ----------------------------------------------------------------------
    def _serve(self, peer: Peer) -> Generator[None, None, bool]:
        """Handle PDUs until release (True) or abort by the peer (False)."""
        command = bytearray()
        while True:
            pdu_type, length = ul.pdu_header((yield from self._exact(6)))
            if pdu_type == ul.P_DATA_TF:
                if self.config.max_pdu and length > self.config.max_pdu:
                    # Longer than the Maximum Length we announced (PS3.8 §D.1).
                    raise ul.ProtocolError("P-DATA-TF longer than our maximum length",
                                           ul.ABORT_INVALID_PDU_PARAMETER)
                yield from self._p_data(peer, length, command)
            elif pdu_type in (ul.A_RELEASE_RQ, ul.A_ABORT):
                if length != ul.FIXED_PDU_LENGTH:  # PS3.8 §9.3.6, §9.3.8: always 4
                    raise ul.ProtocolError("A-RELEASE-RQ / A-ABORT length is not 4",
                                           ul.ABORT_INVALID_PDU_PARAMETER)
                yield from self._exact(length)
                if pdu_type == ul.A_ABORT:
                    return False
                self._send(ul.release_rp())
                return True
            elif pdu_type in (ul.A_ASSOCIATE_RQ, ul.A_ASSOCIATE_AC, ul.A_ASSOCIATE_RJ,
                              ul.A_RELEASE_RP):
                raise ul.ProtocolError(f"unexpected PDU type {pdu_type}", ul.ABORT_UNEXPECTED_PDU)
            else:
                raise ul.ProtocolError(f"unrecognised PDU type {pdu_type}",
                                       ul.ABORT_UNRECOGNIZED_PDU)

    def _p_data(self, peer: Peer, length: int, command: bytearray) -> Wait:
        """Walk the PDVs of one P-DATA-TF PDU (PS3.8 §9.3.5, Annex E)."""
        while length > 0:
            if length < 6:
                raise ul.ProtocolError("PDV header runs past the PDU")
            head = yield from self._exact(6)
            pdv_len = int.from_bytes(head[:4], "big")
            pcid, control = head[4], head[5]
            if pdv_len < 2 or pdv_len + 4 > length or pcid not in self.contexts:
                raise ul.ProtocolError("malformed PDV or unaccepted presentation context")
            length -= 4 + pdv_len
            value_len = pdv_len - 2
            last = bool(control & 0x02)
            if control & 0x01:
                command += yield from self._exact(value_len)
                if len(command) > dimse.MAX_COMMAND_BYTES:
                    raise dimse.CommandError("command set too long")
                if last:
                    self._command(peer, pcid, bytes(command))
                    command.clear()
            else:
                yield from self._data(peer, pcid, value_len, last)

    def _command(self, peer: Peer, pcid: int, raw: bytes) -> None:
        request = dimse.decode_command(raw)
        if self.incoming is not None or self._pending is not None:
            raise ul.ProtocolError("a new command before the previous data set ended")
        if request.field == dimse.C_ECHO_RQ and not request.has_data_set:
            self._respond(pcid, request, self.services.echo(peer))
        elif request.field == dimse.N_EVENT_REPORT_RQ and request.has_data_set:
            self._pending, self._event_data = (pcid, request), bytearray()
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

    def _data(self, peer: Peer, pcid: int, value_len: int, last: bool) -> Wait:
        if self._event_data is not None:
            yield from self._event_information(peer, pcid, value_len, last)
            return
        incoming, pending = self.incoming, self._pending
        if incoming is None or pending is None or pending[0] != pcid:
            raise ul.ProtocolError("data set fragment without its C-STORE command")
        yield from self._stream(value_len, incoming.write)
        if not last:
            return
        self.incoming, self._pending = None, None
        context = self.contexts[pcid]
        request = pending[1]
        store = StoreRequest(
            incoming=incoming, abstract_syntax=context.abstract_syntax,
            transfer_syntax=context.transfer_syntax, sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
        )
        status = yield from self._off_loop(lambda: self.services.store(peer, store))
        metrics.metrics().images.labels(metrics.status_name(status)).inc()
        self._respond(pcid, request, status)

    def _event_information(self, peer: Peer, pcid: int, value_len: int, last: bool) -> Wait:
        """Collect an N-EVENT-REPORT's data set (small), then hand it to the node."""
        data, pending = self._event_data, self._pending
        if data is None or pending is None or pending[0] != pcid:
            raise ul.ProtocolError("data set fragment without its N-EVENT-REPORT command")
        data += yield from self._exact(value_len)
        if len(data) > MAX_EVENT_INFORMATION:
            raise ul.ProtocolError("N-EVENT-REPORT data set too long")
        if not last:
            return
        self._event_data, self._pending = None, None
        context = self.contexts[pcid]
        report = EventReport(context.abstract_syntax, context.transfer_syntax, pending[1],
                             bytes(data))
        status = yield from self._off_loop(lambda: self.services.event_report(peer, report))
        self._respond(pcid, pending[1], status)

    def _respond(self, pcid: int, request: dimse.Command, status: int) -> None:
        message = dimse.response(request, status, self.services.error_comment(status))
        pdus = ul.p_data(pcid, message, command=True, max_pdu=self.peer_max_pdu)
        self._send(b"".join(pdus))
