"""Sending reports to a PACS: C-STORE, confirmation, and ``qcnode echo``.

A delivery opens one association to the destination (calling AE = the node's AE title
unless the destination names another; TCP_NODELAY on the socket; TLS per PS3.15 Annex B
when configured), C-STOREs every object (PS3.4 Annex B), then confirms that the PACS
holds them:

* **Storage Commitment** (PS3.4 Annex J, Push Model): N-ACTION on the same association;
  the PACS answers with an N-EVENT-REPORT on a *new* association to the calling AE, at
  the node's main listener (found in the ledger) or at the destination's
  ``commitment_port`` (:mod:`node.send.scu_commit`). Used with ``confirm = "commitment"``,
  or ``"auto"`` with a ``commitment_port``, when the PACS accepts the SOP class.
* else **C-FIND** (PS3.4 Annex C, Study Root, IMAGE level) for each SOP Instance UID.

**One association, one thread.** :func:`deliver` and :func:`echo` open their own
association and drive it from the calling thread only, one operation at a time (each
C-STORE, N-ACTION, C-FIND waits for its response before the next is sent); the
association never leaves the function. The N-EVENT-REPORT arrives on another
association (the commitment port's pynetdicom server, or the node's main listener via
the ledger) and its handler only records the report. pynetdicom cannot share an
association between threads, and even a single caller races the association's own
reactor thread, which can take a response off the queue and drop it as "unexpected"
(seen with 20 associations in one process; the window exists for one): the send then
waits for the destination's ``timeout``, the delivery fails as transient
(:attr:`Reason.ABORTED`) and is retried (pynetdicom 3.0.4;
docs/benchmarks.md, "pynetdicom senders stall"). ``tests/test_interop.py`` checks on
the wire that concurrent deliveries each use their own association, one request at a
time.

Every failure is an exception carrying a :class:`Failure` that says whether retrying
can help (transient: refused connection, timeout, 0xA7xx out of resources, transient
rejection) or not (permanent: 0xA9xx, 0xCxxx, permanent rejection).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from node.config import DestinationSettings, TlsSettings
from node.send.scu_commit import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentListener,
    ReportLedger,
    ReportWaiter,
    commitment_request,
)

# SOP classes (PS3.4 Annex A Verification; Annex C Study Root Query/Retrieve - FIND).
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

# PS3.7 Annex C status codes (C-STORE statuses: PS3.4 Table B.2-1).
STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_PENDING_WARNING = 0xFF01
STATUS_WARNING_CLASS = 0xB000           # 0xB000–0xBFFF: stored with a warning
STATUS_OUT_OF_RESOURCES_CLASS = 0xA700  # 0xA7xx: refused, out of resources (transient)
STATUS_DATA_MISMATCH_CLASS = 0xA900     # 0xA9xx: data set does not match SOP class
STATUS_CANNOT_UNDERSTAND_CLASS = 0xC000  # 0xCxxx: cannot understand (permanent)
STATUS_PROCESSING_FAILURE = 0x0110      # general failure: the peer may recover
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_NOT_AUTHORIZED = 0x0124
STATUS_CLASS_MASK = 0xFF00
STATUS_HIGH_NIBBLE_MASK = 0xF000

# PS3.8 §9.3.4 A-ASSOCIATE-RJ: result, source and reason/diagnostic.
REJECT_PERMANENT = 0x01
REJECT_TRANSIENT = 0x02
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_SOURCE_PROVIDER_PRESENTATION = 0x03
REJECT_REASON_CALLING_AE = 0x03
REJECT_REASON_CALLED_AE = 0x07


class Reason(StrEnum):
    """Why a delivery (or echo) failed, in terms an admin can act on."""

    CONNECTION_REFUSED = "connection refused"
    TIMEOUT = "timed out"
    UNREACHABLE = "host unreachable"
    TLS = "TLS handshake failed"
    REJECTED_CALLED_AE = "association rejected: wrong called AE title"
    REJECTED_CALLING_AE = "association rejected: calling AE title not known to the peer"
    REJECTED = "association rejected"
    BUSY = "association rejected: peer busy"
    ABORTED = "association aborted"
    NO_CONTEXT = "SOP class not accepted by the peer"
    STORE_TRANSIENT = "C-STORE refused: out of resources"
    STORE_PERMANENT = "C-STORE refused"
    NOT_CONFIRMED = "not confirmed by the peer"
    INTERNAL = "unexpected error while sending"


TRANSIENT_REASONS = frozenset({
    Reason.CONNECTION_REFUSED, Reason.TIMEOUT, Reason.UNREACHABLE, Reason.BUSY,
    Reason.ABORTED, Reason.STORE_TRANSIENT, Reason.NOT_CONFIRMED, Reason.INTERNAL,
})


@dataclass(frozen=True)
class Failure:
    """One failed attempt: the reason, a detail for the log, and whether to retry."""

    reason: Reason
    detail: str

    @property
    def transient(self) -> bool:
        """True when retrying later can succeed."""
        return self.reason in TRANSIENT_REASONS

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


class DeliveryError(Exception):
    """A delivery failed; ``failure.transient`` says whether to retry."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure

    @property
    def transient(self) -> bool:
        """True when retrying later can succeed."""
        return self.failure.transient


Confirmation = Literal["commitment", "find", "none"]


@dataclass(frozen=True)
class DeliveryReceipt:
    """A successful delivery: what was stored, the statuses, and how it was confirmed."""

    destination: str
    sop_instance_uids: tuple[str, ...]
    statuses: tuple[int, ...]
    confirmation: Confirmation
    seconds: float
    transaction_uid: str | None = None  # of the storage commitment request, if any


def classify_store_status(status: int) -> Reason | None:
    """None for success/warning; else the failure reason of a C-STORE status (PS3.4 B.2.3)."""
    if status == STATUS_SUCCESS or status & STATUS_HIGH_NIBBLE_MASK == STATUS_WARNING_CLASS:
        return None
    if status & STATUS_CLASS_MASK == STATUS_OUT_OF_RESOURCES_CLASS:
        return Reason.STORE_TRANSIENT
    if status == STATUS_PROCESSING_FAILURE:
        return Reason.STORE_TRANSIENT
    return Reason.STORE_PERMANENT


def classify_rejection(result: int, source: int, diagnostic: int) -> Reason:
    """The reason of an A-ASSOCIATE-RJ (PS3.8 §9.3.4)."""
    if source == REJECT_SOURCE_SERVICE_USER and diagnostic == REJECT_REASON_CALLED_AE:
        return Reason.REJECTED_CALLED_AE
    if source == REJECT_SOURCE_SERVICE_USER and diagnostic == REJECT_REASON_CALLING_AE:
        return Reason.REJECTED_CALLING_AE
    if result == REJECT_TRANSIENT or source == REJECT_SOURCE_PROVIDER_PRESENTATION:
        return Reason.BUSY
    return Reason.REJECTED


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client-side TLS context for PS3.15 Annex B secure transport."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file is not None:
        key = str(tls.key_file) if tls.key_file is not None else None
        ctx.load_cert_chain(str(tls.cert_file), key)
    return ctx


def _probe(host: str, port: int, timeout: float) -> Failure:
    """Why a TCP connection to host:port fails (called only after a failed association)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Failure(Reason.ABORTED, f"{host}:{port} accepted TCP but not the association")
    except ConnectionRefusedError:
        return Failure(Reason.CONNECTION_REFUSED, f"nothing listens on {host}:{port}")
    except TimeoutError:
        return Failure(Reason.TIMEOUT, f"no answer from {host}:{port} within {timeout:g} s")
    except OSError as exc:
        return Failure(Reason.UNREACHABLE, f"{host}:{port}: {exc.strerror or exc}")


class _Session:
    """Associate with a destination; collect the rejection details pynetdicom hides."""

    def __init__(self, dest: DestinationSettings, node_ae: str, contexts: Sequence[str]) -> None:
        self.dest = dest
        self.calling_ae = dest.calling_ae_title or node_ae
        self.ae = AE(ae_title=self.calling_ae)
        self.ae.acse_timeout = dest.timeout
        self.ae.dimse_timeout = dest.timeout
        self.ae.network_timeout = dest.timeout
        self.ae.connection_timeout = dest.timeout
        for uid in dict.fromkeys(contexts):
            self.ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.connected = False
        self.reject: tuple[int, int, int] | None = None

    def _on_open(self, event: Any) -> None:
        self.connected = True
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_pdu(self, event: Any) -> None:
        # The A-ASSOCIATE-RJ PDU as the DUL thread decodes it. Not the ACSE primitive
        # (EVT_ACSE_RECV): when the peer closes right after its RJ (Orthanc does),
        # pynetdicom's ACSE sometimes takes the connection's end first and reports an
        # abort, and the rejection's reason was lost (2 in 60 C-ECHOs to Orthanc).
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ) and pdu.result in (REJECT_PERMANENT,
                                                               REJECT_TRANSIENT):
            self.reject = (int(pdu.result), int(pdu.source or 0),
                           int(pdu.reason_diagnostic or 0))

    def open(self) -> Any:
        """An established association, or :class:`DeliveryError`."""
        tls = None
        if self.dest.tls is not None:
            tls = (tls_context(self.dest.tls), self.dest.host)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_PDU_RECV, self._on_pdu)
        ]
        try:
            assoc = self.ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title,
                                      tls_args=tls, evt_handlers=handlers)
        except ssl.SSLError as exc:
            raise DeliveryError(Failure(Reason.TLS, str(exc))) from exc
        if assoc.is_established:
            return assoc
        if self.reject is not None:
            result, source, diag = self.reject
            reason = classify_rejection(result, source, diag)
            detail = (f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port} rejected calling "
                      f"AE {self.calling_ae} (result {result}, source {source}, reason {diag})")
            raise DeliveryError(Failure(reason, detail))
        if not self.connected:
            if self.dest.tls is not None:
                failure = _probe(self.dest.host, self.dest.port, self.dest.timeout)
                if failure.reason is Reason.ABORTED:
                    failure = Failure(Reason.TLS, "the peer accepted TCP but not the TLS handshake")
                raise DeliveryError(failure)
            raise DeliveryError(_probe(self.dest.host, self.dest.port, self.dest.timeout))
        raise DeliveryError(Failure(Reason.ABORTED, "the peer aborted the association request"))


def _with_meta(ds: Dataset) -> Dataset:
    """``ds`` with a File Meta Information transfer syntax (needed to encode it)."""
    if "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset()):
        return ds
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _store_all(assoc: Any, datasets: Sequence[Dataset]) -> list[int]:
    statuses: list[int] = []
    for ds in datasets:
        try:
            rsp = assoc.send_c_store(_with_meta(ds))
        except ValueError as exc:  # no accepted presentation context for this SOP class
            raise DeliveryError(Failure(Reason.NO_CONTEXT, str(exc))) from exc
        if not rsp or "Status" not in rsp:
            raise DeliveryError(Failure(Reason.ABORTED, "no C-STORE response (timeout or abort)"))
        status = int(rsp.Status)
        reason = classify_store_status(status)
        if reason is not None:
            raise DeliveryError(Failure(reason, f"status 0x{status:04X} for {ds.SOPInstanceUID}"))
        statuses.append(status)
    return statuses


def _find_confirms(assoc: Any, ds: Dataset) -> bool:
    """True when a C-FIND at IMAGE level finds ``ds``'s SOP Instance UID (PS3.4 C.4.1)."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = ds.StudyInstanceUID
    query.SeriesInstanceUID = ds.SeriesInstanceUID
    query.SOPInstanceUID = ds.SOPInstanceUID
    found = False
    for status, ident in assoc.send_c_find(query, STUDY_ROOT_FIND):
        code = int(status.Status) if status and "Status" in status else None
        if code in (STATUS_PENDING, STATUS_PENDING_WARNING) and ident is not None:
            found = found or ident.get("SOPInstanceUID") == ds.SOPInstanceUID
        elif code is None or classify_store_status(code) is not None:
            return False
    return found


def _contexts(datasets: Sequence[Dataset], confirm: str, commit: bool) -> list[str]:
    uids = [str(ds.SOPClassUID) for ds in datasets]
    if confirm in ("auto", "find"):
        uids.append(STUDY_ROOT_FIND)
    if commit:
        uids.append(STORAGE_COMMITMENT_PUSH_MODEL)
    return uids


def _accepted(assoc: Any, sop_class: str) -> bool:
    return any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts)


def deliver(
    datasets: Sequence[Dataset], dest: DestinationSettings, *, node_ae: str,
    bind_host: str = "0.0.0.0",  # noqa: S104 - the PACS connects back for commitment
    node_port: int | None = None, ledger: ReportLedger | None = None,
) -> DeliveryReceipt:
    """C-STORE ``datasets`` to ``dest`` and confirm them; raise :class:`DeliveryError`.

    ``node_port`` and ``ledger``: the node's main listener, where the PACS may send its
    storage commitment report too (recorded in ``ledger``); None: only the separate
    ``commitment_port``.
    """
    start = time.monotonic()
    commit = dest.uses_commitment
    session = _Session(dest, node_ae, _contexts(datasets, dest.confirm, commit))
    uids = tuple(str(ds.SOPInstanceUID) for ds in datasets)
    own_port = dest.commitment_port is not None and dest.commitment_port != node_port
    listener = CommitmentListener(session.calling_ae, bind_host, dest.commitment_port) \
        if commit and own_port and dest.commitment_port is not None else None
    waiter = _waiter(dest, session.calling_ae, node_ae, bind_host, node_port, ledger, listener)
    with listener if listener is not None else nullcontext():
        assoc = session.open()
        try:
            statuses = _store_all(assoc, datasets)
            confirmation, transaction = _confirm(assoc, datasets, dest, waiter)
        finally:
            if assoc.is_established:
                assoc.release()
    return DeliveryReceipt(dest.name, uids, tuple(statuses), confirmation,
                           time.monotonic() - start, transaction)


def _waiter(dest: DestinationSettings, calling_ae: str, node_ae: str, bind_host: str,
            node_port: int | None, ledger: ReportLedger | None,
            listener: CommitmentListener | None) -> ReportWaiter | None:
    """Where the N-EVENT-REPORT may arrive: the main listener (reports to the node's own
    AE title only) and/or the separate commitment port."""
    if not dest.uses_commitment:
        return None
    main = ledger is not None and node_port is not None and calling_ae == node_ae
    routes = [f"{calling_ae} at {bind_host}:{node_port}"] if main else []
    if listener is not None:
        routes.append(f"{calling_ae} at {bind_host}:{dest.commitment_port}")
    if not routes:
        return None
    return ReportWaiter(dest.name, dest.ae_title, listener, ledger if main else None,
                        tuple(routes))


def _confirm(assoc: Any, datasets: Sequence[Dataset], dest: DestinationSettings,
             waiter: ReportWaiter | None) -> tuple[Confirmation, str | None]:
    if dest.confirm == "none":
        return "none", None
    if waiter is not None and _accepted(assoc, STORAGE_COMMITMENT_PUSH_MODEL):
        outcome = commitment_request(assoc, waiter, datasets, dest.timeout)
        if not outcome.ok:
            raise DeliveryError(Failure(Reason.NOT_CONFIRMED, outcome.detail))
        return "commitment", outcome.transaction_uid
    if dest.confirm == "commitment":
        why = ("the PACS does not accept it" if waiter is not None
               else "no route for its reports (a calling AE of its own needs a "
                    "commitment_port)")
        raise DeliveryError(Failure(Reason.NO_CONTEXT, f"storage commitment: {why}"))
    if not _accepted(assoc, STUDY_ROOT_FIND):
        raise DeliveryError(Failure(Reason.NO_CONTEXT, "neither commitment nor C-FIND accepted"))
    missing = [str(ds.SOPInstanceUID) for ds in datasets if not _find_confirms(assoc, ds)]
    if missing:
        raise DeliveryError(Failure(Reason.NOT_CONFIRMED, f"C-FIND does not find {missing[0]}"))
    return "find", None


def echo(dest: DestinationSettings, *, node_ae: str) -> float:
    """C-ECHO ``dest`` (PS3.4 Annex A); the round trip in seconds, or :class:`DeliveryError`."""
    start = time.monotonic()
    session = _Session(dest, node_ae, [VERIFICATION])
    assoc = session.open()
    try:
        rsp = assoc.send_c_echo()
        if not rsp or "Status" not in rsp:
            raise DeliveryError(Failure(Reason.ABORTED, "no C-ECHO response"))
        if int(rsp.Status) != STATUS_SUCCESS:
            raise DeliveryError(Failure(Reason.STORE_PERMANENT, f"status 0x{int(rsp.Status):04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return time.monotonic() - start


_ADVICE = {
    Reason.CONNECTION_REFUSED: "is the PACS running, and are host and port right?",
    Reason.TIMEOUT: "check the host address, firewalls, and that the PACS is up",
    Reason.UNREACHABLE: "check the host address and the network route",
    Reason.TLS: "check the CA file, certificates and that the PACS speaks TLS on this port",
    Reason.REJECTED_CALLED_AE: "set ae_title to the PACS's own AE title",
    Reason.REJECTED_CALLING_AE: "add the calling AE title (and this host) to the PACS's "
                                "modality table",
    Reason.REJECTED: "check both AE titles and the PACS's modality table",
    Reason.BUSY: "the PACS is busy; try again later",
    Reason.ABORTED: "is this port a DICOM port? check the PACS's log",
}


def echo_main(args: argparse.Namespace) -> int:
    """``qcnode echo NAME``: C-ECHO a configured destination, say what failed in words;
    with Storage Commitment configured, one commitment round trip too
    (:mod:`node.send.commit_check`)."""
    from node.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        dest = settings.destination(args.name)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyError:
        print(f"no destination named {args.name!r} in the configuration", file=sys.stderr)
        return 2
    calling = dest.calling_ae_title or settings.node.ae_title
    target = f"{dest.name} ({dest.ae_title} at {dest.host}:{dest.port}, calling AE {calling})"
    try:
        seconds = echo(dest, node_ae=settings.node.ae_title)
    except DeliveryError as exc:
        advice = _ADVICE.get(exc.failure.reason, "")
        print(f"FAILED {target}: {exc.failure}" + (f" — {advice}" if advice else ""))
        return 1
    print(f"OK {target}: C-ECHO answered in {seconds * 1000:.0f} ms")
    if not dest.uses_commitment:
        return 0
    from node.send.commit_check import check_commitment

    ok, detail = check_commitment(dest, settings)
    print(f"{'OK' if ok else 'FAILED'} {target}: storage commitment: {detail}")
    return 0 if ok else 1
