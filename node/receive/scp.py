"""The C-STORE / C-ECHO listener (PS3.4 Annex A Verification, Annex B Storage).

The network side is :mod:`node.receive.acceptor` (a lean DICOM Upper Layer acceptor, PS3.8);
this module decides what happens to each association and instance:

* **Who may call.** The calling AE title and the peer's IP address must match a
  ``[[senders]]`` entry, and the called AE title must be ours; otherwise the
  association is rejected (A-ASSOCIATE-RJ, PS3.8 §9.3.4: rejected-permanent,
  service-user, reason 3 "calling AE title not recognised" / 7 "called AE title not
  recognised").
* **Idle or slow connections cannot lock senders out.** A connection must complete
  its A-ASSOCIATE-RQ within the (short) ACSE timeout from its accept; only
  established associations count against ``max_associations``; the listener keeps at
  most ``max_associations`` + 16 sockets, and a host named in ``[[senders]]`` takes
  the place of a negotiating connection from a host that is not
  (:class:`node.receive.acceptor_server.AcceptorServer`); each source host may hold at most
  ``max_associations_per_host`` connections.
* **The receive path only receives, checks, journals, answers.** The data set
  streams into the association's journal segment (:mod:`node.store.journal`);
  :func:`scan_header` checks UIDs and pixel-data completeness without decoding; one
  ``fdatasync`` makes the record durable, and only then is Success returned. The
  journal applier (:mod:`node.store.ingest`) moves it into the spool and the ledger; the
  association's end is recorded once that is done for everything it stored.
* **Bad input is refused, never acknowledged** (PS3.4 Annex B.2.3): a malformed data
  set — truncated, an unknown VR, an image class without pixel data, a deflated data
  set inflating past its bound, an unacceptable UID — gets 0xC210, one whose SOP
  Instance UID differs from the command's 0xC212, one whose SOP Class UID differs
  0xA900; each is kept in ``<home>/quarantine`` with its reason. A C-STORE on a
  context that is not a storage class (Verification) is refused with 0x0122.
  An unexpected error while storing answers 0xC213 (0xA700 when memory ran out) and
  quarantines the data set; the association goes on.
* **Storage Commitment reports** (PS3.4 J.3.3) from the configured destinations that
  use commitment are admitted for that SOP class alone and recorded in the ledger
  (:mod:`node.receive.scp_commit`).
* **Status codes are named** (PS3.4 Annex B.2.3, PS3.7 Annex C): see the ``STATUS_*``
  constants.
* **TCP_NODELAY** on the listening and on every accepted socket (DICOM's request /
  response pattern stalls on Nagle's algorithm).
"""

from __future__ import annotations

import errno
import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from pydicom import uid as pyuid
from pydicom._uid_dict import UID_dictionary
from pynetdicom.presentation import AllStoragePresentationContexts

from node.config import Settings
from node.logs import get_logger
from node.receive.acceptor import AcceptorConfig, EventReport, Incoming, Peer, StoreRequest
from node.receive.acceptor_server import AcceptorServer
from node.receive.dicomio import InstanceHeader, MalformedDataset, scan_header
from node.receive.scp_commit import ERROR_COMMENTS as REPORT_ERROR_COMMENTS
from node.receive.scp_commit import CommitmentReports, ReportRecorder
from node.receive.tls import TlsPort, server_context
from node.send.scu_commit import STORAGE_COMMITMENT_PUSH_MODEL
from node.store.ingest import Applier, RecordingLedger, entry_meta
from node.store.journal import Journal, JournalError, Record, Writer
from node.store.spool import Spool, SpoolFull

log = get_logger(__name__)

# C-STORE response statuses (PS3.4 Annex B.2.3; PS3.7 Annex C) ----------------------------
STATUS_SUCCESS = 0x0000
#: Refused: Not Authorized (PS3.7 C.5.x) — a routing rule refuses this series.
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124
#: Refused: Out of Resources (PS3.4 B.2.3) — the spool disk is past its watermark.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (PS3.4 B.2.3) — the data set's SOP Class
#: UID differs from the command's Affected SOP Class UID.
STATUS_DATASET_MISMATCH = 0xA900
#: Error: Cannot Understand (C2xx, PS3.4 B.2.3): the dataset is malformed or truncated.
STATUS_CANNOT_UNDERSTAND = 0xC210
#: Error: Cannot Understand: the dataset's SOP Instance UID differs from the request's.
STATUS_UID_MISMATCH = 0xC212
#: Error: Cannot Understand: the node failed to record the instance (journal error, or
#: an unexpected error while storing).
STATUS_PROCESSING_FAILURE = 0xC213
#: Refused: SOP Class not supported (PS3.7 C.5.x) — the command's class is not the
#: presentation context's abstract syntax.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Error Comment (0000,0902) sent with each failure status: at most 64 characters, no
#: patient data (PS3.7 §9.1.1.1.9, Annex C.4).
ERROR_COMMENTS: dict[int, str] = {
    STATUS_REFUSED_NOT_AUTHORIZED: "Refused by the node's routing rules",
    STATUS_OUT_OF_RESOURCES: "Out of resources (disk or memory): retry later",
    STATUS_DATASET_MISMATCH: "Data set SOP Class UID differs from the command",
    STATUS_CANNOT_UNDERSTAND: "Malformed or truncated data set (quarantined)",
    STATUS_UID_MISMATCH: "Data set SOP Instance UID differs from the command",
    STATUS_PROCESSING_FAILURE: "Stored but not recorded: internal error",
    STATUS_SOP_CLASS_NOT_SUPPORTED: "SOP Class differs from the presentation context",
}

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

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: Storage Commitment Push Model (PS3.4 Annex J): its SCP sends N-EVENT-REPORT on an
#: association it requests and proposes itself as SCP (J.3.3) — our role answer for
#: it, once the class is supported (node.receive.negotiation answers every other class: the
#: requestor is SCU, we are SCP).
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
ROLES: dict[str, tuple[bool, bool]] = {STORAGE_COMMITMENT_PUSH: (False, True)}
#: Named "... Storage ..." in the registry but not stored with C-STORE: Storage
#: Commitment Push/Pull (PS3.4 Annex J) and the DICOMDIR's Media Storage Directory
#: Storage (PS3.10 §7.3, a file-set object only).
NOT_STORAGE_SOP_CLASSES = frozenset({
    STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.20.2", "1.2.840.10008.1.3.10",
})
#: Every Storage SOP Class of the standard's registry (PS3.6 Annex A, retired ones
#: included: a modality still sends the retired US Image Storage, and a refused class
#: made Orthanc's whole store job fail half-way), as pydicom lists them, with those
#: pynetdicom knows and pydicom does not yet. Routing rules still decide per instance.
#: pynetdicom's own acceptor caps a list like this at 128 contexts; ours has no cap.
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    uid for uid, (name, kind, *_) in UID_dictionary.items()
    if kind == "SOP Class" and "Storage" in name and uid not in NOT_STORAGE_SOP_CLASSES
) | frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
#: Storage SOP Classes of images (PS3.4 B.5, named "... Image Storage"): their IODs
#: include the Image Pixel Module, whose Pixel Data is Type 1 unless a Pixel Data
#: Provider URL stands in for it (PS3.3 C.7.6.3) — only with JPIP transfer syntaxes,
#: which the node does not accept. Checked by the header scan at no extra cost.
IMAGE_STORAGE_CLASSES: frozenset[str] = frozenset(
    uid for uid in STORAGE_SOP_CLASSES if "Image Storage" in pyuid.UID(uid).name
)
#: A C-STORE whose journal commit takes longer than this is logged (a stalled disk;
#: senders give up after their DIMSE timeout, often 30 s).
SLOW_STORE_SECONDS = 1.0
#: qcnode's Implementation Class UID and Version Name (PS3.7 D.3.3.2, PS3.10 §7.1).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.10365451129798785511095758564847613115"
IMPLEMENTATION_VERSION_NAME = "QCNODE_010"


class LedgerLike(RecordingLedger, ReportRecorder, Protocol):
    """The part of :class:`node.ledger.Ledger` the listener uses."""

    def association_opened(self, assoc_id: str, calling_ae: str, address: str) -> None: ...
    def association_closed(self, assoc_id: str, *, aborted: bool = False) -> None: ...


class Listener:
    """The node's DICOM listener (see the module documentation).

    Parameters
    ----------
    settings
        The node's settings (AE title, bind address, limits, timeouts, senders, rules).
    spool
        Where accepted instances go (its ``tmp/`` receives the data sets).
    ledger
        Where they are recorded (``None`` only in tests of the receive path).
    on_association_closed
        Called once an association's end is recorded (after its images were applied;
        in the journal applier's thread, or in the listener's if nothing was pending),
        e.g. to wake the completion monitor.

    The receive journal lives in ``<home>/journal``; :meth:`recover` replays what a
    crash left there (called by :meth:`start` if the node did not call it first).
    """

    def __init__(
        self, settings: Settings, spool: Spool, ledger: LedgerLike | None,
        on_association_closed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self._on_closed = on_association_closed
        self._server: AcceptorServer | None = None
        self._supported = self.acceptor_config().supported
        self.journal = Journal(settings.node.home / "journal",
                               segment_bytes=settings.spool.journal_segment_bytes,
                               segments=settings.spool.journal_segments)
        self.applier = Applier(self.journal, spool, ledger)
        self._recovered = False
        self._lock = threading.Lock()
        self._writers: dict[str, Writer] = {}
        self._tickets: dict[str, int] = {}
        self.reports = CommitmentReports(settings.destinations, ledger)

    def acceptor_config(self) -> AcceptorConfig:
        """Identity, limits and the supported contexts, from ``[node]``."""
        node = self.settings.node
        supported: dict[str, tuple[str, ...]] = {VERIFICATION_SOP_CLASS: ECHO_TRANSFER_SYNTAXES}
        for sop_class in sorted(STORAGE_SOP_CLASSES):
            supported[sop_class] = TRANSFER_SYNTAXES
        return AcceptorConfig(
            ae_title=node.ae_title, max_pdu=node.max_pdu, acse_timeout=node.acse_timeout,
            network_timeout=node.network_timeout, supported=supported, roles=ROLES,
            implementation_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION_NAME,
        )

    def admits(self, calling_ae: str, address: str, tls_names: frozenset[str] | None = None
               ) -> dict[str, tuple[str, ...]] | None:
        """What this caller may use: a ``[[senders]]`` entry admits storage and C-ECHO
        (``tls_names``: its verified certificate's names on the TLS port, :mod:`node.receive.tls`);
        a destination that uses commitment may send its reports (and C-ECHO)."""
        sender = any(s.admits(calling_ae, address, tls_names) for s in self.settings.senders)
        reporter = self.reports.admits(calling_ae, address)
        if not sender and not reporter:
            return None
        supported: dict[str, tuple[str, ...]] = dict(self._supported) if sender else {
            VERIFICATION_SOP_CLASS: ECHO_TRANSFER_SYNTAXES}
        if reporter:
            supported[STORAGE_COMMITMENT_PUSH_MODEL] = ECHO_TRANSFER_SYNTAXES
        return supported

    def event_report(self, peer: Peer, report: EventReport) -> int:
        """N-EVENT-REPORT (PS3.7 §10.1.1): a Storage Commitment report, into the ledger."""
        return self.reports.event_report(peer, report)

    def known_host(self, address: str) -> bool:
        """True when some ``[[senders]]`` entry names this host (whatever AE title):
        its connections come first when the listener's sockets run out."""
        return any(_host_matches(s.host, address) for s in self.settings.senders)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (port 0 in the settings picks a free one)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return self._server.address

    def recover(self) -> int:
        """Replay the journal (records acknowledged before a crash); how many."""
        if self._recovered:
            return 0
        count = self.applier.recover()
        self._recovered = True
        return count

    def start(self) -> None:
        """Replay the journal, bind and start accepting associations (in a thread)."""
        node = self.settings.node
        self.recover()
        self.applier.start()
        tls = (TlsPort(node.tls_port, server_context(node.tls), self)
               if node.tls is not None and node.tls_port is not None else None)
        self._server = AcceptorServer(
            node.host, node.port, self.acceptor_config(), self,
            max_associations=node.max_associations,
            max_per_host=node.max_associations_per_host, tls=tls,
        )
        self._server.start()
        if self._server.tls_address is not None:
            log.info("listening with TLS", port=self._server.tls_address[1])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running associations finish (then abort them), close."""
        if self._server is not None:
            self._server.stop(timeout)
            self._server = None
        self.applier.stop(timeout)
        self.journal.close()

    # Association events (called by the acceptor: its loop thread or a pool thread) ----
    def opened(self, peer: Peer) -> None:
        """An association was accepted."""
        structlog.contextvars.bind_contextvars(calling_ae=peer.calling_ae,
                                               assoc_id=peer.assoc_id)
        if self.ledger is not None:
            self.ledger.association_opened(peer.assoc_id, peer.calling_ae, peer.address)
        with self._lock:
            self._writers[peer.assoc_id] = self.journal.writer()
        log.info("association accepted", address=peer.address)

    def closed(self, peer: Peer, *, aborted: bool) -> None:
        """An association was released or aborted.

        Its end goes into the ledger once everything it stored was applied to the
        spool and the ledger (in the applier's thread, later, unless that is done). The
        last open association hurries the applier (its series can then complete
        without waiting for a pause); while others still send, it waits for one.
        """
        try:
            with self._lock:
                writer = self._writers.pop(peer.assoc_id, None)
                ticket = self._tickets.pop(peer.assoc_id, 0)
                last = not self._writers
            if writer is not None:
                writer.close()
            log.info("association closed", aborted=aborted)
            self.applier.after(ticket, lambda: self._record_closed(peer.assoc_id, aborted),
                               hurry=last)
        finally:
            structlog.contextvars.unbind_contextvars("calling_ae", "assoc_id", "series_uid")

    def _record_closed(self, assoc_id: str, aborted: bool) -> None:
        try:
            if self.ledger is not None:
                self.ledger.association_closed(assoc_id, aborted=aborted)
        finally:
            if self._on_closed is not None:
                self._on_closed()

    # DIMSE services -------------------------------------------------------------------
    def echo(self, peer: Peer) -> int:
        """C-ECHO (PS3.4 Annex A): always Success."""
        return STATUS_SUCCESS

    def error_comment(self, status: int) -> str | None:
        """The Error Comment of a failure ``status`` (see :data:`ERROR_COMMENTS`)."""
        return ERROR_COMMENTS.get(status) or REPORT_ERROR_COMMENTS.get(status)

    def incoming(self, peer: Peer, part10_header: bytes) -> Incoming:
        """A journal record for the data set that starts arriving."""
        with self._lock:
            writer = self._writers[peer.assoc_id]
        try:
            record: Incoming = writer.begin()
        except JournalError as exc:
            log.error("journal: no segment for the data set", error=exc.strerror)
            record = _Unwritable()
        record.write(memoryview(part10_header))
        return record

    def store(self, peer: Peer, request: StoreRequest) -> int:
        """Receive one C-STORE: validate, journal durably, answer (PS3.4 B.2).

        An unexpected error answers a failure status (the data set quarantined)
        instead of ending the association: 0xA700 when memory ran out, else 0xC213.
        """
        try:
            return self._store(peer, request)
        except Exception as exc:  # answered and logged
            log.exception("store failed", sop_instance_uid=request.sop_instance_uid)
            status = (STATUS_OUT_OF_RESOURCES if isinstance(exc, MemoryError)
                      else STATUS_PROCESSING_FAILURE)
            record = request.incoming
            if isinstance(record, Record) and not record.error:
                self._refuse_malformed(record, f"internal error: {type(exc).__name__}",
                                       status)
            return status

    def _store(self, peer: Peer, request: StoreRequest) -> int:
        record = request.incoming
        if record.error or not isinstance(record, Record):
            log.error("spool full: data set not written",
                      sop_instance_uid=request.sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES
        if (request.sop_class_uid != request.abstract_syntax
                or request.abstract_syntax == VERIFICATION_SOP_CLASS):
            log.warning("C-STORE refused", reason="SOP Class not a storage class of the "
                        "presentation context", sop_class_uid=request.sop_class_uid)
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        header = self._checked(record, request)
        if isinstance(header, int):
            return header
        structlog.contextvars.bind_contextvars(series_uid=header.series_instance_uid)
        rule = self.settings.rule_for(
            header.modality, header.sop_class_uid, header.series_description
        )
        if rule is None or rule.action == "reject":
            log.info("instance refused by rule", rule=rule.name if rule else None,
                     sop_instance_uid=header.sop_instance_uid)
            return STATUS_REFUSED_NOT_AUTHORIZED
        return self._commit(peer, record, header, rule.action, rule.name)

    def _checked(self, record: Record, request: StoreRequest) -> InstanceHeader | int:
        """The data set's header scanned and matched against the command, or the
        status of its refusal (the data set quarantined)."""
        try:
            with record.view() as data:
                header = scan_header(data, image_classes=IMAGE_STORAGE_CLASSES)
        except MalformedDataset as exc:
            return self._refuse_malformed(record, exc.reason, STATUS_CANNOT_UNDERSTAND)
        if header.sop_class_uid != request.sop_class_uid:
            return self._refuse_malformed(
                record, "dataset SOP Class UID differs from the request",
                STATUS_DATASET_MISMATCH,
            )
        if header.sop_instance_uid != request.sop_instance_uid:
            return self._refuse_malformed(
                record, "dataset SOP Instance UID differs from the request",
                STATUS_UID_MISMATCH,
            )
        return header

    def _commit(
        self, peer: Peer, record: Record, header: InstanceHeader, action: str, rule: str
    ) -> int:
        """Check the watermark, make the record durable, queue it for the applier."""
        try:
            self.spool.check_room(record.size)
        except SpoolFull:
            log.error("spool full: refusing instance", sop_instance_uid=header.sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES
        start = time.perf_counter()
        try:
            entry = record.writer.commit(record, entry_meta(
                header, peer.calling_ae, peer.assoc_id, action, rule))
        except JournalError as exc:
            log.error("journal commit failed", sop_instance_uid=header.sop_instance_uid,
                      error=exc.strerror)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return STATUS_OUT_OF_RESOURCES
            return STATUS_PROCESSING_FAILURE
        ticket = self.applier.submit(entry)
        with self._lock:
            self._tickets[peer.assoc_id] = ticket
        elapsed = time.perf_counter() - start
        if elapsed > SLOW_STORE_SECONDS:
            log.warning("slow journal commit", sop_instance_uid=header.sop_instance_uid,
                        seconds=round(elapsed, 3))
        log.debug("instance journaled", sop_instance_uid=header.sop_instance_uid)
        return STATUS_SUCCESS

    def _refuse_malformed(self, record: Record, reason: str, status: int) -> int:
        """Keep the refused data set in the quarantine (best effort: the refusal is
        answered whether or not it could be kept); ``status``."""
        try:
            with record.view() as data:
                staged = self.spool.stage(data)
            target = self.spool.quarantine(staged, reason)
        except Exception:  # logged; the refusal stands
            log.exception("malformed dataset could not be quarantined", reason=reason)
        else:
            log.warning("malformed dataset quarantined", reason=reason, file=target.name,
                        status=f"0x{status:04X}")
        return status


def _host_matches(pattern: str, address: str) -> bool:
    """``address`` in a ``[[senders]]`` host pattern ("any", an address or network)."""
    if pattern == "any":
        return True
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(pattern)
    except ValueError:
        return False


class _Unwritable:
    """A data set with nowhere to go (no journal segment): read on, answer 0xA700."""

    def __init__(self) -> None:
        self.size = 0
        self.error = True

    def write(self, data: memoryview) -> None:
        self.size += len(data)

    def discard(self) -> None:
        pass

