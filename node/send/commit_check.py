"""``qcnode echo`` for a destination that uses Storage Commitment (PS3.4 Annex J).

A C-ECHO proves the PACS answers; it says nothing about the way back. For a destination
that asks for commitment the echo also runs one whole commitment round trip without
storing anything: an N-ACTION for a test object the PACS has never seen (a fresh SOP
Instance UID), then the wait for the PACS's N-EVENT-REPORT on every route a delivery
would use — the node's main listener (``qcnode serve`` must be running: it records the
report in the ledger) and/or the destination's ``commitment_port`` (listened on here).
The expected answer is Event Type 2 with the test object in the Failed SOP Sequence
(Failure Reason 0x0112, no such object instance). A PACS that reports the test object
committed cannot be trusted to confirm deliveries, and the check says so.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

from pydicom.uid import generate_uid

from node.config import DestinationSettings, Settings
from node.ledger import Ledger
from node.send.scu import DeliveryError, Reason, _accepted, _probe, _Session, _waiter
from node.send.scu_commit import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentListener,
    CommitmentOutcome,
    ReportWaiter,
    request_report,
)

#: The SOP class of the test object (CT Image Storage, PS3.4 B.5).
TEST_OBJECT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def check_commitment(dest: DestinationSettings, settings: Settings) -> tuple[bool, str]:
    """One commitment round trip with ``dest`` for a test object: (ok, what happened)."""
    node = settings.node
    calling = dest.calling_ae_title or node.ae_title
    own_port = dest.commitment_port is not None and dest.commitment_port != node.port
    listener = CommitmentListener(calling, node.host, dest.commitment_port) \
        if own_port and dest.commitment_port is not None else None
    with Ledger.open(settings.ledger_url) if calling == node.ae_title else nullcontext() as led:
        waiter = _waiter(dest, calling, node.ae_title, node.host, node.port, led, listener)
        if waiter is None:
            return False, ("no route for the PACS's reports: a calling AE of its own "
                           "(calling_ae_title) needs a commitment_port")
        test_uid = generate_uid()
        start = time.monotonic()
        outcome = _round_trip(dest, node.ae_title, waiter, listener, test_uid)
    if isinstance(outcome, str):
        return False, outcome
    if outcome.report is None:
        return False, outcome.detail + _listener_down(waiter, node.host, node.port)
    if test_uid in outcome.report.committed:
        return False, (f"{dest.ae_title} reported a test object it was never sent as "
                       "committed: its commitment reports cannot confirm deliveries")
    reasons = dict(outcome.report.failed)
    why = f", failure reason 0x{reasons[test_uid]:04X}" if test_uid in reasons else ""
    seconds = time.monotonic() - start
    return True, (f"report from {dest.ae_title} arrived at {outcome.route} in "
                  f"{seconds * 1000:.0f} ms (a test object it does not hold: not "
                  f"committed{why}, as expected)")


def _round_trip(dest: DestinationSettings, node_ae: str, waiter: ReportWaiter,
                listener: CommitmentListener | None, test_uid: str) -> CommitmentOutcome | str:
    """N-ACTION for the test object and the wait for its report; a str says what failed
    before the request could be made."""
    try:
        with listener if listener is not None else nullcontext():
            session = _Session(dest, node_ae, [STORAGE_COMMITMENT_PUSH_MODEL])
            assoc = session.open()
            try:
                if not _accepted(assoc, STORAGE_COMMITMENT_PUSH_MODEL):
                    return "the PACS does not accept the Storage Commitment SOP class"
                return request_report(assoc, waiter, [(TEST_OBJECT_CLASS, test_uid)],
                                      dest.timeout)
            finally:
                if assoc.is_established:
                    assoc.release()
    except OSError as exc:  # the commitment port is taken (a delivery holds it?)
        return (f"cannot listen on commitment port {dest.commitment_port}: "
                f"{exc.strerror or exc} (a delivery running? try again)")
    except DeliveryError as exc:
        return str(exc.failure)


def _listener_down(waiter: ReportWaiter, host: str, port: int) -> str:
    """A hint when the main listener, a route of ``waiter``, does not even accept TCP."""
    if waiter.ledger is None:
        return ""
    failure = _probe(host, port, timeout=2.0)
    if failure.reason is Reason.CONNECTION_REFUSED:
        return f" (nothing listens on {host}:{port}: is `qcnode serve` running?)"
    return ""
