"""Storage Commitment Push Model, SCU side (PS3.4 Annex J).

The node asks the PACS to commit to keeping the objects it just stored (N-ACTION,
Action Type ID 1, on the storage association); the PACS answers later with an
N-EVENT-REPORT (Event Type ID 1 all committed, 2 some failed), usually on a new
association that *it* opens to the calling AE, taking the SCP role of the SOP class
(PS3.4 J.3.3, PS3.7 D.3.3.4). Where that association goes is the PACS's choice (its
modality table), so the report may arrive on either of two routes:

* **the node's main listener** (:mod:`node.receive.scp`, any process of the node): it admits
  the configured destinations for this SOP class and records the report in the ledger
  (table ``commitments``), where the delivering process — an io worker, maybe on
  another host — finds it by Transaction UID (:class:`ReportLedger`);
* **a separate commitment port** (``commitment_port``): :class:`CommitmentListener`
  (pynetdicom) accepts it in the delivering process for the time of one delivery.

:class:`ReportWaiter` waits on both and says in words what to check when nothing came.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from node.ledger.commitments import CommitmentReport

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"           # PS3.4 J.3
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known instance

ACTION_REQUEST_COMMITMENT = 1       # PS3.4 J.3.2: Request Storage Commitment
EVENT_ALL_COMMITTED = 1             # PS3.4 J.3.3: Storage Commitment Request Successful
EVENT_SOME_FAILED = 2               # Storage Commitment Request Complete - Failures Exist
STATUS_SUCCESS = 0x0000
#: Failure Reason (0008,1197) when a PACS does not hold an object (PS3.4 J.3.3.1.1).
FAILURE_NO_SUCH_OBJECT = 0x0112
#: How often the waiting side looks into the ledger for a report.
LEDGER_POLL_SECONDS = 0.1
#: How long the commitment port stays open for a report association to end, and how
#: often that is checked.
SETTLE_SECONDS = 5.0
SETTLE_POLL_SECONDS = 0.02


def report_from_dataset(event_type: int, ds: Dataset) -> CommitmentReport:
    """The :class:`CommitmentReport` of an N-EVENT-REPORT's Event Information."""
    committed = frozenset(
        str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in i
    )
    failed = tuple(
        (str(i.ReferencedSOPInstanceUID), int(i.get("FailureReason", 0)))
        for i in ds.get("FailedSOPSequence", []) if "ReferencedSOPInstanceUID" in i
    )
    return CommitmentReport(event_type, committed, failed)


class CommitmentListener:
    """Accept N-EVENT-REPORTs for the calling AE on ``port`` while in a ``with`` block."""

    def __init__(self, ae_title: str, host: str, port: int) -> None:
        self.ae_title = ae_title
        self.address = (host, port)
        self._reports: dict[str, CommitmentReport] = {}
        self._cond = threading.Condition()
        self._server: Any = None

    def _on_report(self, event: Any) -> tuple[int, None]:
        """pynetdicom's EVT_N_EVENT_REPORT handler: (status, event reply) — a bare int
        made pynetdicom abort the association, and the PACS logged the report failed."""
        ds = event.event_information
        report = report_from_dataset(int(event.event_type), ds)
        with self._cond:
            self._reports[str(ds.TransactionUID)] = report
            self._cond.notify_all()
        return STATUS_SUCCESS, None

    def __enter__(self) -> CommitmentListener:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=True, scp_role=True)
        ae.require_called_aet = True
        self._server = ae.start_server(
            self.address, block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop listening once the PACS's report associations ended (released after it
        read our N-EVENT-REPORT-RSP, at most :data:`SETTLE_SECONDS`): the waiting side
        wakes as soon as the report is recorded, before pynetdicom sends the response,
        and shutting down at once aborted it (Orthanc: "Unable to read N-EVENT-REPORT
        response")."""
        if self._server is None:
            return
        deadline = time.monotonic() + SETTLE_SECONDS
        while self._server.active_associations and time.monotonic() < deadline:
            time.sleep(SETTLE_POLL_SECONDS)
        self._server.shutdown()
        self._server = None

    def wait(self, transaction_uid: str, timeout: float) -> CommitmentReport | None:
        """The report of a transaction, or None after ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: transaction_uid in self._reports, timeout=timeout)
            return self._reports.get(transaction_uid)


class ReportLedger(Protocol):
    """The part of the ledger the waiting side uses (:mod:`node.ledger.commitments`)."""

    def expect_commitment(self, transaction_uid: str, destination: str, peer_ae: str) -> None: ...
    def commitment_report(self, transaction_uid: str) -> CommitmentReport | None: ...


@dataclass(frozen=True)
class ReportWaiter:
    """Waits for the report of a transaction on every route that is open.

    ``listener`` is the separate commitment port's (or None); ``ledger`` receives what
    the node's main listener got (or None); ``routes`` names where the PACS may send
    (``QCNODE at 10.0.0.5:11112``) for the message when nothing came.
    """

    destination: str
    peer_ae: str
    listener: CommitmentListener | None
    ledger: ReportLedger | None
    routes: tuple[str, ...]

    def expect(self, transaction_uid: str) -> None:
        """Record the transaction before its N-ACTION, so an early report finds it."""
        if self.ledger is not None:
            self.ledger.expect_commitment(transaction_uid, self.destination, self.peer_ae)

    def wait(self, transaction_uid: str, timeout: float) -> tuple[CommitmentReport, str] | None:
        """The first report of ``transaction_uid`` and the route it came by, or None
        after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            step = max(0.0, min(left, LEDGER_POLL_SECONDS if self.ledger else left))
            if self.listener is not None:
                report = self.listener.wait(transaction_uid, step)
                if report is not None:
                    return report, self.routes[-1]
            else:
                time.sleep(step)
            if self.ledger is not None:
                report = self.ledger.commitment_report(transaction_uid)
                if report is not None:
                    return report, self.routes[0]
            if left <= 0:
                return None

    def silence(self, timeout: float) -> str:
        """What to check when no report came within ``timeout`` seconds."""
        return (f"no N-EVENT-REPORT from {self.peer_ae} within {timeout:g} s: check that "
                f"{self.peer_ae} sends its storage commitment reports to "
                + " or ".join(self.routes))


@dataclass(frozen=True)
class CommitmentOutcome:
    """The result of one commitment request."""

    ok: bool
    detail: str
    transaction_uid: str
    report: CommitmentReport | None = None
    route: str = ""  # where the report arrived


def commitment_action(refs: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information (PS3.4 J.3.2.1.1): a new Transaction UID and the
    ``(SOP Class UID, SOP Instance UID)`` of each object."""
    request = Dataset()
    request.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    request.ReferencedSOPSequence = items
    return request


def request_report(
    assoc: Any, waiter: ReportWaiter, refs: Sequence[tuple[str, str]], timeout: float
) -> CommitmentOutcome:
    """N-ACTION for ``refs`` and wait for the N-EVENT-REPORT (ok: a report arrived)."""
    request = commitment_action(refs)
    uid = str(request.TransactionUID)
    waiter.expect(uid)
    status, _ = assoc.send_n_action(
        request, ACTION_REQUEST_COMMITMENT, STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    )
    if not status or "Status" not in status:
        return CommitmentOutcome(False, "no N-ACTION response (timeout or abort)", uid)
    if int(status.Status) != STATUS_SUCCESS:
        return CommitmentOutcome(
            False, f"N-ACTION (storage commitment request) refused: status "
                   f"0x{int(status.Status):04X}", uid)
    found = waiter.wait(uid, timeout)
    if found is None:
        return CommitmentOutcome(False, waiter.silence(timeout), uid)
    return CommitmentOutcome(True, "reported", uid, *found)


def commitment_request(
    assoc: Any, waiter: ReportWaiter, datasets: Sequence[Dataset], timeout: float
) -> CommitmentOutcome:
    """Request commitment for ``datasets`` and wait: ok when all were committed."""
    refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets]
    outcome = request_report(assoc, waiter, refs, timeout)
    if outcome.report is None:
        return outcome
    wanted = {uid for _, uid in refs}
    report = outcome.report
    if report.event_type != EVENT_ALL_COMMITTED or not wanted <= report.committed:
        failed = sorted(wanted - report.committed)
        reasons = dict(report.failed)
        first = failed[0] if failed else ""
        why = f" (failure reason 0x{reasons[first]:04X})" if first in reasons else ""
        return CommitmentOutcome(
            False, f"commitment failed for {len(failed)} object(s), e.g. {first}{why}",
            outcome.transaction_uid, report, outcome.route)
    return CommitmentOutcome(True, "committed", outcome.transaction_uid, report, outcome.route)
