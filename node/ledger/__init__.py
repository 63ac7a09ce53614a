"""The ledger: the node's source of truth (SQLAlchemy 2; SQLite default, PostgreSQL by URL).

``Ledger(url)`` connects; ``Ledger.open(url)`` first migrates the schema to the newest
Alembic revision. The API is split by concern:

* :class:`~node.ledger.instances.InstanceAPI` — the listener's hot path (instances,
  associations), see :meth:`Ledger.record_instance`.
"""

from __future__ import annotations

from node.ledger.base import InvalidTransition, LedgerError, NotFound, VersionConflict
from node.ledger.instances import InstanceAPI, InstanceRecord
from node.ledger.models import ConfirmedBy, DeliveryState, JobState, SeriesState


class Ledger(InstanceAPI):
    """The ledger's whole API (see the module documentation)."""


__all__ = [
    "ConfirmedBy",
    "DeliveryState",
    "InstanceRecord",
    "InvalidTransition",
    "JobState",
    "Ledger",
    "LedgerError",
    "NotFound",
    "SeriesState",
    "VersionConflict",
]
