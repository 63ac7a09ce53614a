"""Storage Commitment transactions shared by the listener and the delivering worker.

A delivery that asks the PACS for Storage Commitment (PS3.4 J.3.2) records its
Transaction UID here before the N-ACTION (:meth:`CommitmentAPI.expect_commitment`). The
PACS's N-EVENT-REPORT (J.3.3) may reach the node's main listener — another process, on
another host than a scale-out io worker — which records it in the same row
(:meth:`CommitmentAPI.record_commitment_report`); the worker polls
:meth:`CommitmentAPI.commitment_report` until it is there. Rows older than
:data:`KEEP_DAYS` are dropped when a new transaction starts.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from node.ledger.base import LedgerBase
from node.ledger.models import Commitment, utcnow

#: Days a transaction's row is kept (for an admin reading the ledger).
KEEP_DAYS = 30


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT said (PS3.4 J.3.3.1): the committed SOP Instance UIDs and
    the failed ones with their Failure Reason (0008,1197)."""

    event_type: int
    committed: frozenset[str]
    failed: tuple[tuple[str, int], ...]


class CommitmentAPI(LedgerBase):
    """Expect, record and read Storage Commitment reports."""

    def expect_commitment(self, transaction_uid: str, destination: str, peer_ae: str) -> None:
        """A commitment request to ``destination`` (AE ``peer_ae``) is about to be sent."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(delete(Commitment).where(
                Commitment.requested_at < now - dt.timedelta(days=KEEP_DAYS)))
            conn.execute(self._insert(Commitment).values(
                transaction_uid=transaction_uid, destination=destination, peer_ae=peer_ae,
                requested_at=now,
            ).on_conflict_do_nothing())

    def record_commitment_report(
        self, transaction_uid: str, peer_ae: str, *, event_type: int,
        committed: Iterable[str], failed: Iterable[tuple[str, int]],
    ) -> bool:
        """Record the report of a transaction this node requested from ``peer_ae``;
        False when there is no such transaction (unknown, or another peer's)."""
        with self._write() as conn:
            result = conn.execute(
                update(Commitment)
                .where(Commitment.transaction_uid == transaction_uid,
                       Commitment.peer_ae == peer_ae)
                .values(reported_at=utcnow(), event_type=event_type,
                        committed=json.dumps(sorted(committed)),
                        failed=json.dumps([[uid, reason] for uid, reason in failed]))
            )
            return bool(result.rowcount)

    def commitment_report(self, transaction_uid: str) -> CommitmentReport | None:
        """The recorded report of a transaction, or None (not reported, or unknown)."""
        with self._read() as conn:
            row = conn.execute(
                select(Commitment.event_type, Commitment.committed, Commitment.failed)
                .where(Commitment.transaction_uid == transaction_uid,
                       Commitment.reported_at.is_not(None))
            ).one_or_none()
        if row is None or row.event_type is None:
            return None
        failed = tuple((str(uid), int(reason)) for uid, reason in json.loads(row.failed or "[]"))
        return CommitmentReport(int(row.event_type), frozenset(json.loads(row.committed or "[]")),
                                failed)
