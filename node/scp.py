"""The C-STORE / C-ECHO listener (PS3.4 Annex A Verification, Annex B Storage).

A pynetdicom server, hardened:

* **Who may call.** The calling AE title and the peer's IP address must match a
  ``[[senders]]`` entry, and the called AE title must be ours; otherwise the
  association is rejected (A-ASSOCIATE-RJ, PS3.8 §9.3.4: rejected-permanent,
  service-user, reason 3 "calling AE title not recognised" / 7 "called AE title not
  recognised").
* **Idle connections cannot lock senders out.** A connection must send its
  A-ASSOCIATE-RQ within the (short) ACSE timeout, each source host may hold at most
  ``max_associations_per_host`` connections, and the global limit is
  ``max_associations``.
* **The association thread only receives, writes, records, answers.** The dataset
  streams to a temporary file (``STORE_RECV_CHUNKED_DATASET``); :func:`read_header`
  checks UIDs and pixel-data completeness without decoding; the file is moved into the
  spool and fsync'd, then recorded in the ledger, and only then is Success returned.
* **Status codes are named** (PS3.4 Annex B.2.3, PS3.7 Annex C): see the ``STATUS_*``
  constants.
* **TCP_NODELAY** on the listening and on every accepted socket (DICOM's request /
  response pattern stalls on Nagle's algorithm), SO_REUSEPORT when several listener
  processes share the port.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import socketserver
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from pydicom import uid as pyuid
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.config import Settings
from node.dicomio import InstanceHeader, MalformedDataset, read_header
from node.ledger.instances import InstanceRecord
from node.logs import get_logger
from node.spool import Spool, SpoolFull, Stored

log = get_logger(__name__)

# C-STORE response statuses (PS3.4 Annex B.2.3; PS3.7 Annex C) ----------------------------
STATUS_SUCCESS = 0x0000
#: Refused: Not Authorized (PS3.7 C.5.x) — a routing rule refuses this series.
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124
#: Refused: Out of Resources (PS3.4 B.2.3) — the spool disk is past its watermark.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: Cannot Understand (C2xx, PS3.4 B.2.3): the dataset is malformed or truncated.
STATUS_CANNOT_UNDERSTAND = 0xC210
#: Error: Cannot Understand: the dataset's SOP Instance UID differs from the request's.
STATUS_UID_MISMATCH = 0xC212
#: Error: Cannot Understand: the node failed to record the instance (ledger error).
STATUS_PROCESSING_FAILURE = 0xC213

# A-ASSOCIATE-RJ (PS3.8 §9.3.4) ------------------------------------------------------------
RJ_REJECTED_PERMANENT = 0x01
RJ_SOURCE_SERVICE_USER = 0x01
RJ_CALLING_AE_NOT_RECOGNISED = 0x03
RJ_CALLED_AE_NOT_RECOGNISED = 0x07

#: Transfer syntaxes pydicom (with pylibjpeg) can decode, accepted for every storage class.
#: Compressed first: when a sender proposes its file's compressed syntax and an
#: uncompressed one in the same context, we take the file as it is (no conversion).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    pyuid.JPEG2000Lossless, pyuid.JPEG2000, pyuid.HTJ2KLossless, pyuid.HTJ2KLosslessRPCL,
    pyuid.HTJ2K, pyuid.JPEGLSLossless, pyuid.JPEGLSNearLossless, pyuid.JPEGLosslessSV1,
    pyuid.JPEGLossless, pyuid.JPEGBaseline8Bit, pyuid.JPEGExtended12Bit, pyuid.RLELossless,
    pyuid.DeflatedExplicitVRLittleEndian, pyuid.ExplicitVRLittleEndian,
    pyuid.ImplicitVRLittleEndian, pyuid.ExplicitVRBigEndian,
)
#: Verification (PS3.4 Annex A) needs no dataset: the uncompressed syntaxes suffice.
ECHO_TRANSFER_SYNTAXES = (pyuid.ExplicitVRLittleEndian, pyuid.ImplicitVRLittleEndian)

_STRIPES = 64
#: Longest idle wait of the association reactors (ARTIM / release checks run this often).
IDLE_WAIT = 0.02
FALLBACK_DELAY = 0.001
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


class LedgerLike(Protocol):
    """The part of :class:`node.ledger.Ledger` the listener uses."""

    def versions_of(self, sop_instance_uid: str) -> list[tuple[int, str]]: ...
    def record_instance(self, rec: InstanceRecord) -> None: ...
    def association_opened(self, assoc_id: str, calling_ae: str, address: str) -> None: ...
    def association_closed(self, assoc_id: str, *, aborted: bool = False) -> None: ...


@dataclass(frozen=True)
class _AssocInfo:
    assoc_id: str
    calling_ae: str
    address: str


class _AllowListACSE(ACSE):
    """ACSE that checks calling AE + source address against ``[[senders]]`` first."""

    def __init__(self, assoc: Association, admits: Callable[[str, str], bool]) -> None:
        super().__init__(assoc)
        self._admits = admits

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling = str(request.calling_ae_title if request else "").strip()
        address = str(self.assoc.requestor.address)
        if not self._admits(calling, address):
            log.warning("association rejected", reason="calling AE/host not allowed",
                        calling_ae=calling, address=address)
            self.send_reject(
                RJ_REJECTED_PERMANENT, RJ_SOURCE_SERVICE_USER, RJ_CALLING_AE_NOT_RECOGNISED
            )
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


class _Server(ThreadedAssociationServer):
    """Association server with TCP_NODELAY, SO_REUSEPORT and a per-host limit."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, *args: Any, reuse_port: bool, per_host: int, **kwargs: Any) -> None:
        self._reuse_port = reuse_port
        self._per_host = per_host
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        """Stop serving and close the socket (the AE does not track this server)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        same = sum(
            1 for a in self.active_associations if str(a.requestor.address) == host
        )
        if same >= self._per_host:
            log.warning("connection refused", reason="per-host association limit",
                        address=host, limit=self._per_host)
            return False
        return True


class _WakeableDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waking on socket data or an outgoing PDU.

    pynetdicom's reactor sleeps ``_run_loop_delay`` (1 ms) whenever a loop found no
    event, several times per C-STORE. Here that delay is a property that waits in
    ``select`` on the peer socket and a wake-up socket pair (written by
    :meth:`send_pdu`) for at most :data:`IDLE_WAIT` and then returns 0: the reactor
    reacts at once to data in either direction and idles without spinning.
    """

    _wake_r: socket.socket
    _wake_w: socket.socket

    def init_wake(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    @property
    def _run_loop_delay(self) -> float:
        waitables: list[Any] = [self._wake_r]
        peer = self.socket.socket if self.socket is not None else None
        if peer is not None and peer.fileno() >= 0:
            waitables.append(peer)
        try:
            ready, _, _ = select.select(waitables, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # socket closed meanwhile
            return FALLBACK_DELAY
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        return 0.0

    @_run_loop_delay.setter
    def _run_loop_delay(self, _value: float) -> None:
        return  # pynetdicom's __init__ assigns the default; the property replaces it

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_r.close()
            self._wake_w.close()


class _WaitingDIMSE(DIMSEServiceProvider):
    """DIMSE provider whose non-blocking ``get_msg`` waits briefly for a message.

    The acceptor reactor polls ``get_msg(block=False)`` after a 1 ms sleep; waiting on
    the queue instead hands a received C-STORE to the handler the moment it is whole.
    """

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=IDLE_WAIT)
        except queue.Empty:
            return None, None


def _make_handler(admits: Callable[[str, str], bool]) -> type[RequestHandler]:
    class _Handler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            assoc.acse = _AllowListACSE(assoc, admits)
            # Specialise this association's providers (same state, event-driven waits).
            assoc.dul.__class__ = _WakeableDUL
            cast(_WakeableDUL, assoc.dul).init_wake()
            assoc.dimse.__class__ = _WaitingDIMSE
            return assoc

    return _Handler


class Listener:
    """The node's DICOM listener (see the module documentation).

    Parameters
    ----------
    settings
        The node's settings (AE title, bind address, limits, timeouts, senders, rules).
    spool
        Where accepted instances go.
    ledger
        Where they are recorded (``None`` only in tests of the receive path).
    on_association_closed
        Called (in the association thread) after an association was released or
        aborted, e.g. to wake the completion monitor.
    """

    def __init__(
        self, settings: Settings, spool: Spool, ledger: LedgerLike | None,
        on_association_closed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self._on_closed = on_association_closed
        self._assocs: dict[Association, _AssocInfo] = {}
        self._lock = threading.Lock()
        self._uid_locks = [threading.Lock() for _ in range(_STRIPES)]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    # Set-up -------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        node = self.settings.node
        # Stream datasets to files; keep pynetdicom's per-PDU log handlers off the hot path.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION_SOP_CLASS, list(ECHO_TRANSFER_SYNTAXES))
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        return ae

    def admits(self, calling_ae: str, address: str) -> bool:
        """True when a ``[[senders]]`` entry admits this caller."""
        return any(s.admits(calling_ae, address) for s in self.settings.senders)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (port 0 in the settings picks a free one)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and start accepting associations (in a background thread)."""
        node = self.settings.node
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server = self.ae.make_server(
            (node.host, node.port), evt_handlers=handlers, server_class=_Server,
            request_handler=_make_handler(self.admits),
            reuse_port=node.listener_processes > 1, per_host=node.max_associations_per_host,
        )
        assert isinstance(server, _Server)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2},
            name="qcnode-listener", daemon=True,
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running associations finish (then abort them), close."""
        if self._server is None:
            return
        self._server.shutdown()
        for assoc in list(self._server.active_associations):
            assoc.join(timeout)
            if assoc.is_alive():
                assoc.abort()
        self.ae.shutdown()
        self._server = None

    # Association events ------------------------------------------------------------------
    def _on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        info = _AssocInfo(
            assoc_id=uuid.uuid4().hex[:16],
            calling_ae=str(assoc.requestor.ae_title).strip(),
            address=str(assoc.requestor.address),
        )
        with self._lock:
            self._assocs[assoc] = info
        structlog.contextvars.bind_contextvars(calling_ae=info.calling_ae, assoc_id=info.assoc_id)
        if self.ledger is not None:
            self.ledger.association_opened(info.assoc_id, info.calling_ae, info.address)
        log.info("association accepted", address=info.address)

    def _closed(self, assoc: Association, *, aborted: bool) -> None:
        with self._lock:
            info = self._assocs.pop(assoc, None)
        if info is None:
            return
        try:
            if self.ledger is not None:
                self.ledger.association_closed(info.assoc_id, aborted=aborted)
            log.info("association closed", aborted=aborted)
        finally:
            structlog.contextvars.unbind_contextvars("calling_ae", "assoc_id", "series_uid")
            if self._on_closed is not None:
                self._on_closed()

    def _on_released(self, event: evt.Event) -> None:
        self._closed(event.assoc, aborted=False)

    def _on_aborted(self, event: evt.Event) -> None:
        self._closed(event.assoc, aborted=True)

    def _on_conn_close(self, event: evt.Event) -> None:
        self._closed(event.assoc, aborted=True)

    # DIMSE services -------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """Receive one C-STORE: validate, spool durably, record, answer (PS3.4 B.2)."""
        path = Path(event.dataset_path)
        try:
            header = read_header(path)
        except MalformedDataset as exc:
            return self._refuse_malformed(path, exc.reason, STATUS_CANNOT_UNDERSTAND)
        request = event.request
        assert isinstance(request, C_STORE)
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            return self._refuse_malformed(
                path, "dataset SOP Instance UID differs from the request", STATUS_UID_MISMATCH
            )
        structlog.contextvars.bind_contextvars(series_uid=header.series_instance_uid)
        rule = self.settings.rule_for(
            header.modality, header.sop_class_uid, header.series_description
        )
        if rule is None or rule.action == "reject":
            log.info("instance refused by rule", rule=rule.name if rule else None,
                     sop_instance_uid=header.sop_instance_uid)
            return STATUS_REFUSED_NOT_AUTHORIZED
        with self._uid_locks[hash(header.sop_instance_uid) % _STRIPES]:
            return self._store(event.assoc, path, header, rule.action, rule.name)

    def _store(
        self, assoc: Association, path: Path, header: InstanceHeader, action: str, rule: str
    ) -> int:
        known = self.ledger.versions_of(header.sop_instance_uid) if self.ledger else []
        try:
            stored = self.spool.store(path, header, known)
        except SpoolFull:
            log.error("spool full: refusing instance", sop_instance_uid=header.sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES
        if stored.duplicate:
            log.info("duplicate instance", sop_instance_uid=header.sop_instance_uid,
                     version=stored.version)
            return STATUS_SUCCESS
        try:
            self._record(assoc, header, stored, action, rule)
        except Exception:  # the file is durable; a restart's reconciliation records it
            log.exception("ledger record failed", sop_instance_uid=header.sop_instance_uid)
            return STATUS_PROCESSING_FAILURE
        log.debug("instance stored", sop_instance_uid=header.sop_instance_uid,
                  version=stored.version)
        return STATUS_SUCCESS

    def _record(
        self, assoc: Association, header: InstanceHeader, stored: Stored, action: str, rule: str
    ) -> None:
        if self.ledger is None:
            return
        with self._lock:
            info = self._assocs.get(assoc)
        self.ledger.record_instance(
            instance_record(header, stored, info.calling_ae if info else "",
                            info.assoc_id if info else "", action, rule)
        )

    def _refuse_malformed(self, path: Path, reason: str, status: int) -> int:
        target = self.spool.quarantine(path, reason)
        log.warning("malformed dataset quarantined", reason=reason, file=target.name,
                    status=f"0x{status:04X}")
        return status


def instance_record(
    header: InstanceHeader, stored: Stored, calling_ae: str, assoc_id: str, action: str,
    rule: str,
) -> InstanceRecord:
    """The ledger row for a stored instance."""
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid, modality=header.modality,
        series_description=header.series_description,
        transfer_syntax_uid=header.transfer_syntax_uid, relpath=stored.relpath,
        size=stored.size, sha256=stored.sha256, calling_ae=calling_ae, assoc_id=assoc_id,
        version=stored.version, action=action if action in ("assess", "store") else "assess",
        rule=rule,
    )
