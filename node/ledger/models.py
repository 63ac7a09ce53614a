"""The ledger's schema: SQLAlchemy 2 typed ORM models and the state enums.

Every timestamp is stored in UTC (:class:`UTCDateTime`). The schema is created and
evolved only by the Alembic migrations in :mod:`node.migrations`; a test checks that
these models and the migrations agree (autogenerate shows no difference).

Tables
------
studies, series
    One row per Study / Series Instance UID (PS3.3 C.7.2.1, C.7.3.1). A series carries
    its routing rule, state (:class:`SeriesState`), instance count, the trigger that
    closed it and a *generation* that grows each time late instances re-open it.
instances
    One row per received SOP Instance (PS3.3 C.12.1) and version: the same SOP Instance
    UID with different bytes is kept as version 2, 3, ...; unique ``(sop_uid, version)``.
associations, series_associations
    Each DICOM association (PS3.8 §7.1) and which series it delivered to, so completion
    can wait until every association that fed a series is released.
jobs, deliveries
    One assessment job per ``(series, generation, engine key)`` and one delivery per
    ``(job, destination)``: the idempotency keys of the pipeline. A job records the
    path of the SR file it keeps under ``<home>/reports`` (migration 0002).
commitments
    One row per Storage Commitment transaction (PS3.4 Annex J) a delivery requested,
    and the N-EVENT-REPORT the main listener received for it (migration 0003): the
    listener and the delivering worker are different processes, maybe hosts.
series_events
    The history of each series (state changes, re-openings, SRs produced and
    superseded): the ledger shows every SR ever sent for a series.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

UID_LENGTH = 64  # PS3.5 §9: a UID is at most 64 characters.
AE_LENGTH = 16  # PS3.5 §6.2, VR AE.


class SeriesState(StrEnum):
    """Where a series is in the pipeline."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    ASSESSING = "assessing"
    REPORTING = "reporting"
    DELIVERED = "delivered"
    FAILED = "failed"
    IGNORED = "ignored"
    #: Retention is deleting its files (node.store.retention); resumed after a crash.
    PURGING = "purging"
    #: Its files and instance rows were deleted by retention; the row, its jobs and
    #: history stay (a re-sent series re-opens it: a new generation, new SR UIDs).
    PURGED = "purged"


class JobState(StrEnum):
    """An assessment job: ``pending → assessing → reporting → delivering → done``.

    ``failed`` means the last attempt failed and another is due; ``dead`` is the
    dead-letter state an admin re-queues; ``superseded`` marks the job of an older
    generation once late instances re-opened the series.
    """

    PENDING = "pending"
    ASSESSING = "assessing"
    REPORTING = "reporting"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    SUPERSEDED = "superseded"


class DeliveryState(StrEnum):
    """Sending one SR to one destination."""

    PENDING = "pending"
    SENT = "sent"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    DEAD = "dead"


class ConfirmedBy(StrEnum):
    """How a delivery was confirmed: Storage Commitment (PS3.4 Annex J), C-FIND, or not."""

    COMMITMENT = "commitment"
    FIND = "find"
    NONE = "none"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (UTC).

    PostgreSQL stores ``timestamptz``; SQLite stores ISO text without zone, which
    sorts correctly because every value is UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError("ledger timestamps must be timezone-aware datetimes")
        stamp: dt.datetime = value.astimezone(dt.UTC)
        return stamp.replace(tzinfo=None) if dialect.name == "sqlite" else stamp

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value)}")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention (stable constraint names)."""

    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    """A study (PS3.3 C.7.2.1)."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Series(Base):
    """A series (PS3.3 C.7.3.1) and its progress through the pipeline."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    instance_count: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    reopen_count: Mapped[int] = mapped_column(Integer)
    first_instance_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    generation_started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_instance_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    close_trigger: Mapped[str | None] = mapped_column(String(32))
    state_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    reopened_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    """One received SOP Instance (PS3.3 C.12.1), one row per version."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_uid", "version", name="uq_instances_sop_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    version: Mapped[int] = mapped_column(Integer)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    relpath: Mapped[str] = mapped_column(String(512), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    assoc_id: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(AE_LENGTH))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Association(Base):
    """A DICOM association (PS3.8 §7.1) that sent instances."""

    __tablename__ = "associations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(AE_LENGTH))
    address: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    aborted: Mapped[bool] = mapped_column(Boolean)


Index("ix_associations_open", Association.closed_at)


class SeriesAssociation(Base):
    """Which association delivered instances of which series."""

    __tablename__ = "series_associations"
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), primary_key=True)
    assoc_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Job(Base):
    """An assessment of one generation of a series by one engine (``EngineInfo.key``)."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("series_id", "generation", "engine_key", name="uq_jobs_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    engine_key: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(255))
    result_json: Mapped[str | None] = mapped_column(Text)
    sr_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    superseded_sr_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    #: The SR file, relative to ``<home>/reports`` (``<Study UID>/<SOP Instance UID>.dcm``).
    report_path: Mapped[str | None] = mapped_column(String(512))


class Delivery(Base):
    """Sending a job's SR to one destination, and how it was confirmed."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", name="uq_deliveries_key"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    confirmed_by: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    confirmed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class SeriesEvent(Base):
    """One entry of a series' history (state change, re-opening, SR produced, ...)."""

    __tablename__ = "series_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    generation: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    sr_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))


class Commitment(Base):
    """A Storage Commitment request (PS3.4 J.3.2) and its N-EVENT-REPORT (J.3.3).

    ``committed`` holds the committed SOP Instance UIDs and ``failed`` the failed
    ones with their Failure Reason, as JSON (null until the report arrived).
    """

    __tablename__ = "commitments"
    transaction_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    peer_ae: Mapped[str] = mapped_column(String(AE_LENGTH))
    requested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    event_type: Mapped[int | None] = mapped_column(Integer)
    committed: Mapped[str | None] = mapped_column(Text)
    failed: Mapped[str | None] = mapped_column(Text)


class MppsStep(Base):
    """A Modality Performed Procedure Step (PS3.4 Annex F.7; PS3.3 C.4.13–C.4.14).

    Only the step's SOP Instance UID, its status and who sent it are kept: the step's
    patient and procedure attributes are not stored.
    """

    __tablename__ = "mpps_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    #: Performed Procedure Step Status (0040,0252): IN PROGRESS, COMPLETED, DISCONTINUED.
    status: Mapped[str] = mapped_column(String(16))
    calling_ae: Mapped[str] = mapped_column(String(AE_LENGTH))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class MppsSeries(Base):
    """A series a step references (Performed Series Sequence (0040,0340)).

    ``sop_uids`` is the JSON list of the images and other instances the step lists for
    the series; ``outcome`` is set once the step's end was applied to the series.
    """

    __tablename__ = "mpps_series"
    step_id: Mapped[int] = mapped_column(ForeignKey("mpps_steps.id"), primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(UID_LENGTH), primary_key=True, index=True)
    sop_uids: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(String(32))
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
