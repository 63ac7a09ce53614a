"""The C-STORE / C-ECHO listener (PS3.4 Annex A Verification, Annex B Storage).

The network side is :mod:`node.acceptor` (a lean DICOM Upper Layer acceptor, PS3.8);
this module decides what happens to each association and instance:

* **Who may call.** The calling AE title and the peer's IP address must match a
  ``[[senders]]`` entry, and the called AE title must be ours; otherwise the
  association is rejected (A-ASSOCIATE-RJ, PS3.8 §9.3.4: rejected-permanent,
  service-user, reason 3 "calling AE title not recognised" / 7 "called AE title not
  recognised").
* **Idle connections cannot lock senders out.** A connection must send its
  A-ASSOCIATE-RQ within the (short) ACSE timeout, each source host may hold at most
  ``max_associations_per_host`` connections, and the global limit is
  ``max_associations``.
* **The association thread only receives, writes, records, answers.** The data set
  streams to a temporary Part 10 file (hashed on the way); :func:`read_header` checks
  UIDs and pixel-data completeness without decoding; the file is fsync'd and moved
  into the spool (directory fsync'd), then recorded in the ledger, and only then is
  Success returned.
* **Status codes are named** (PS3.4 Annex B.2.3, PS3.7 Annex C): see the ``STATUS_*``
  constants.
* **TCP_NODELAY** on the listening and on every accepted socket (DICOM's request /
  response pattern stalls on Nagle's algorithm), SO_REUSEPORT when several listener
  processes share the port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog
from pydicom import uid as pyuid
from pynetdicom.presentation import AllStoragePresentationContexts

from node.acceptor import AcceptorConfig, Peer, StoreRequest
from node.acceptor_server import AcceptorServer
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
#: Refused: SOP Class not supported (PS3.7 C.5.x) — the command's class is not the
#: presentation context's abstract syntax.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Error Comment (0000,0902) sent with each failure status: at most 64 characters, no
#: patient data (PS3.7 §9.1.1.1.9, Annex C.4).
ERROR_COMMENTS: dict[int, str] = {
    STATUS_REFUSED_NOT_AUTHORIZED: "Refused by the node's routing rules",
    STATUS_OUT_OF_RESOURCES: "Spool disk full: retry later",
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

#: Per-UID lock stripes (duplicates of one SOP Instance UID are stored one at a time).
_STRIPES = 4096
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: A C-STORE whose spooling + recording takes longer than this is logged (a stalled disk
#: or a ledger write lock held by another process; senders give up after their DIMSE
#: timeout, often 30 s).
SLOW_STORE_SECONDS = 1.0
#: qcnode's Implementation Class UID and Version Name (PS3.7 D.3.3.2, PS3.10 §7.1).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.10365451129798785511095758564847613115"
IMPLEMENTATION_VERSION_NAME = "QCNODE_010"


class LedgerLike(Protocol):
    """The part of :class:`node.ledger.Ledger` the listener uses."""

    def versions_of(self, sop_instance_uid: str) -> list[tuple[int, str]]: ...
    def record_instance(self, rec: InstanceRecord) -> None: ...
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
        self._uid_locks = [threading.Lock() for _ in range(_STRIPES)]
        self._server: AcceptorServer | None = None

    def acceptor_config(self) -> AcceptorConfig:
        """Identity, limits and the supported contexts, from ``[node]``."""
        node = self.settings.node
        supported: dict[str, tuple[str, ...]] = {VERIFICATION_SOP_CLASS: ECHO_TRANSFER_SYNTAXES}
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                supported[str(cx.abstract_syntax)] = TRANSFER_SYNTAXES
        return AcceptorConfig(
            ae_title=node.ae_title, max_pdu=node.max_pdu, acse_timeout=node.acse_timeout,
            network_timeout=node.network_timeout, tmp_dir=self.spool.tmp,
            supported=supported, implementation_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION_NAME,
        )

    def admits(self, calling_ae: str, address: str) -> bool:
        """True when a ``[[senders]]`` entry admits this caller."""
        return any(s.admits(calling_ae, address) for s in self.settings.senders)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (port 0 in the settings picks a free one)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return self._server.address

    def start(self) -> None:
        """Bind and start accepting associations (in a background thread)."""
        node = self.settings.node
        self._server = AcceptorServer(
            node.host, node.port, self.acceptor_config(), self,
            max_associations=node.max_associations,
            max_per_host=node.max_associations_per_host,
        )
        self._server.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running associations finish (then abort them), close."""
        if self._server is None:
            return
        self._server.stop(timeout)
        self._server = None

    # Association events (called by the acceptor in the association's thread) ----------
    def opened(self, peer: Peer) -> None:
        """An association was accepted."""
        structlog.contextvars.bind_contextvars(calling_ae=peer.calling_ae,
                                               assoc_id=peer.assoc_id)
        if self.ledger is not None:
            self.ledger.association_opened(peer.assoc_id, peer.calling_ae, peer.address)
        log.info("association accepted", address=peer.address)

    def closed(self, peer: Peer, *, aborted: bool) -> None:
        """An association was released or aborted."""
        try:
            if self.ledger is not None:
                self.ledger.association_closed(peer.assoc_id, aborted=aborted)
            log.info("association closed", aborted=aborted)
        finally:
            structlog.contextvars.unbind_contextvars("calling_ae", "assoc_id", "series_uid")
            if self._on_closed is not None:
                self._on_closed()

    # DIMSE services -------------------------------------------------------------------
    def echo(self, peer: Peer) -> int:
        """C-ECHO (PS3.4 Annex A): always Success."""
        return STATUS_SUCCESS

    def error_comment(self, status: int) -> str | None:
        """The Error Comment of a failure ``status`` (see :data:`ERROR_COMMENTS`)."""
        return ERROR_COMMENTS.get(status)

    def store(self, peer: Peer, request: StoreRequest) -> int:
        """Receive one C-STORE: validate, spool durably, record, answer (PS3.4 B.2)."""
        path = request.path
        if request.write_error:
            log.error("spool full: data set not written",
                      sop_instance_uid=request.sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES
        if request.sop_class_uid != request.abstract_syntax:
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        try:
            header = read_header(path)
        except MalformedDataset as exc:
            return self._refuse_malformed(path, exc.reason, STATUS_CANNOT_UNDERSTAND)
        if header.sop_instance_uid != request.sop_instance_uid:
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
            return self._store(peer, request, header, rule.action, rule.name)

    def _store(
        self, peer: Peer, request: StoreRequest, header: InstanceHeader, action: str,
        rule: str,
    ) -> int:
        start = time.perf_counter()
        known = self.ledger.versions_of(header.sop_instance_uid) if self.ledger else []
        try:
            stored = self.spool.store(request.path, header, known, sha256=request.sha256)
        except SpoolFull:
            log.error("spool full: refusing instance", sop_instance_uid=header.sop_instance_uid)
            return STATUS_OUT_OF_RESOURCES
        if stored.duplicate:
            log.info("duplicate instance", sop_instance_uid=header.sop_instance_uid,
                     version=stored.version)
            return STATUS_SUCCESS
        spooled = time.perf_counter()
        try:
            self._record(peer, header, stored, action, rule)
        except Exception:  # the file is durable; a restart's reconciliation records it
            log.exception("ledger record failed", sop_instance_uid=header.sop_instance_uid)
            return STATUS_PROCESSING_FAILURE
        recorded = time.perf_counter()
        if recorded - start > SLOW_STORE_SECONDS:  # senders time out (DIMSE timeout)
            log.warning("slow instance store", sop_instance_uid=header.sop_instance_uid,
                        spool_seconds=round(spooled - start, 3),
                        ledger_seconds=round(recorded - spooled, 3))
        log.debug("instance stored", sop_instance_uid=header.sop_instance_uid,
                  version=stored.version)
        return STATUS_SUCCESS

    def _record(
        self, peer: Peer, header: InstanceHeader, stored: Stored, action: str, rule: str
    ) -> None:
        if self.ledger is None:
            return
        self.ledger.record_instance(
            instance_record(header, stored, peer.calling_ae, peer.assoc_id, action, rule)
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
