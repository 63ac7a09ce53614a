"""The ledger: the node's source of truth (SQLAlchemy 2; SQLite default, PostgreSQL by URL).

``Ledger(url)`` connects; ``Ledger.open(url)`` first migrates the schema to the newest
Alembic revision. The API is split by concern:

* :class:`~node.ledger.instances.InstanceAPI` — the listener's hot path (instances,
  associations), see :meth:`Ledger.record_instance`;
* :class:`~node.ledger.series.SeriesAPI` — completion queries, the series state
  machine (:data:`~node.ledger.series.SERIES_TRANSITIONS`), history, listings;
* :class:`~node.ledger.jobs.JobAPI` — the pipeline's jobs and deliveries;
* :class:`~node.ledger.commitments.CommitmentAPI` — Storage Commitment transactions
  and the reports the listener received for them.
* :class:`~node.ledger.mpps.MppsAPI` — Modality Performed Procedure Steps (a
  :class:`~node.ledger.series.SeriesAPI` that also closes series by them).
"""

from __future__ import annotations

from node.ledger.base import InvalidTransition, LedgerError, NotFound, VersionConflict
from node.ledger.commitments import CommitmentAPI, CommitmentReport
from node.ledger.instances import InstanceAPI, InstanceRecord
from node.ledger.jobs import (
    DELIVERY_TRANSITIONS,
    JOB_TRANSITIONS,
    DeliveryInfo,
    FailureInfo,
    JobAPI,
    JobInfo,
)
from node.ledger.models import ConfirmedBy, DeliveryState, JobState, SeriesState
from node.ledger.mpps import MppsAPI
from node.ledger.series import (
    SERIES_TRANSITIONS,
    OpenSeries,
    SeriesEventInfo,
    SeriesInfo,
)


class Ledger(InstanceAPI, JobAPI, MppsAPI, CommitmentAPI):
    """The ledger's whole API (see the module documentation)."""


__all__ = [
    "DELIVERY_TRANSITIONS",
    "JOB_TRANSITIONS",
    "SERIES_TRANSITIONS",
    "CommitmentReport",
    "ConfirmedBy",
    "DeliveryInfo",
    "DeliveryState",
    "FailureInfo",
    "InstanceRecord",
    "InvalidTransition",
    "JobInfo",
    "JobState",
    "Ledger",
    "LedgerError",
    "NotFound",
    "OpenSeries",
    "SeriesEventInfo",
    "SeriesInfo",
    "SeriesState",
    "VersionConflict",
]
