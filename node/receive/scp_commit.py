"""Storage Commitment reports on the node's main listener (PS3.4 J.3.3, PS3.7 §10.1.1).

A PACS sends its N-EVENT-REPORT to the AE that asked for commitment, at the address its
modality table gives for that AE — naturally qcnode's main AE title and port. The
listener therefore admits every destination that uses commitment (its AE title, from
its host) for the Storage Commitment Push Model SOP Class only (plus C-ECHO), accepts
the PACS's SCP role for it (PS3.7 §D.3.3.4), and records the report in the ledger's
``commitments`` row of the transaction; the delivering io worker — another process,
maybe on another host — polls that row (:mod:`node.send.scu_commit`).

A report for a transaction this node did not ask that peer for is refused with Invalid
Argument Value; one that cannot be recorded with Processing Failure (the PACS may send
it again).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from io import BytesIO
from typing import Protocol

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import ImplicitVRLittleEndian

from node.config import DestinationSettings
from node.logs import get_logger
from node.receive.acceptor import EventReport, Peer
from node.send.scu_commit import (
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    STORAGE_COMMITMENT_PUSH_MODEL,
    report_from_dataset,
)

log = get_logger(__name__)

# N-EVENT-REPORT statuses (PS3.7 §10.1.1.1.8, Annex C) -------------------------------------
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT_VALUE = 0x0115
STATUS_NO_SUCH_SOP_CLASS = 0x0118
STATUS_MISSING_ATTRIBUTE = 0x0120

ERROR_COMMENTS: dict[int, str] = {
    STATUS_PROCESSING_FAILURE: "Report not recorded: internal error, send again",
    STATUS_NO_SUCH_EVENT_TYPE: "Event Type ID is not 1 or 2 (PS3.4 J.3.3)",
    STATUS_INVALID_ARGUMENT_VALUE: "Unknown Transaction UID for this AE",
    STATUS_NO_SUCH_SOP_CLASS: "Only Storage Commitment Push Model reports",
    STATUS_MISSING_ATTRIBUTE: "Event Information lacks a Transaction UID",
}


class ReportRecorder(Protocol):
    """The part of :class:`node.ledger.Ledger` that records reports."""

    def record_commitment_report(
        self, transaction_uid: str, peer_ae: str, *, event_type: int,
        committed: Iterable[str], failed: Iterable[tuple[str, int]],
    ) -> bool: ...


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses of a destination's ``host`` (resolved once, at start)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("commitment peer host does not resolve", host=host, error=str(exc))
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


class CommitmentReports:
    """Admits the commitment destinations and records the reports they send."""

    def __init__(self, destinations: Iterable[DestinationSettings],
                 ledger: ReportRecorder | None) -> None:
        self.ledger = ledger
        self._peers = [(d.ae_title, _addresses(d.host))
                       for d in destinations if d.uses_commitment]

    def admits(self, calling_ae: str, address: str) -> bool:
        """True when a destination that uses commitment has this AE title and address."""
        if self.ledger is None:
            return False
        ae = calling_ae.strip(" ")
        return any(ae == title and address in hosts for title, hosts in self._peers)

    def event_report(self, peer: Peer, report: EventReport) -> int:
        """Record one N-EVENT-REPORT; its response status (see the module doc)."""
        command = report.command
        if (report.abstract_syntax != STORAGE_COMMITMENT_PUSH_MODEL
                or command.sop_class_uid != STORAGE_COMMITMENT_PUSH_MODEL):
            return STATUS_NO_SUCH_SOP_CLASS
        if command.event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
            return STATUS_NO_SUCH_EVENT_TYPE
        try:
            ds = _decode(report.data, report.transfer_syntax)
            uid = str(ds.TransactionUID) if "TransactionUID" in ds else ""
            parsed = report_from_dataset(command.event_type, ds)
        except (InvalidDicomError, ValueError, TypeError, AttributeError, EOFError) as exc:
            log.warning("commitment report unreadable", error=type(exc).__name__)
            return STATUS_PROCESSING_FAILURE
        if not uid:
            return STATUS_MISSING_ATTRIBUTE
        try:
            known = self.ledger is not None and self.ledger.record_commitment_report(
                uid, peer.calling_ae, event_type=parsed.event_type,
                committed=parsed.committed, failed=parsed.failed)
        except Exception:  # a ledger outage: the PACS may send the report again
            log.exception("commitment report not recorded", transaction_uid=uid)
            return STATUS_PROCESSING_FAILURE
        log.info("commitment report received", transaction_uid=uid,
                 event_type=parsed.event_type, committed=len(parsed.committed),
                 failed=len(parsed.failed), known=known)
        return STATUS_SUCCESS if known else STATUS_INVALID_ARGUMENT_VALUE


def _decode(data: bytes, transfer_syntax: str) -> Dataset:
    """The Event Information data set, little endian (the context's transfer syntax)."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
    ds: Dataset = read_dataset(BytesIO(data), is_implicit_VR=implicit, is_little_endian=True)
    return ds
