"""Jobs and deliveries: the pipeline's idempotent state (issue 5).

A job is keyed by ``(series, generation, engine key)`` (``EngineInfo.key`` from
:mod:`inference.result`), a delivery by ``(job, destination)``: creating either twice
returns the existing row, so a redelivered Celery task finds its own earlier work.
States move only along :data:`JOB_TRANSITIONS` / :data:`DELIVERY_TRANSITIONS`;
moving to the current state is allowed (a redelivered task repeating a step).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, select, update

from node.ledger.base import InvalidTransition, LedgerBase, NotFound
from node.ledger.models import (
    ConfirmedBy,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    SeriesState,
    utcnow,
)
from node.ledger.series import SERIES_TRANSITIONS, SeriesAPI

J, D = JobState, DeliveryState
_ALL_JOB = frozenset(JobState)
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    J.PENDING: frozenset({J.PENDING, J.ASSESSING, J.FAILED, J.DEAD, J.SUPERSEDED}),
    J.ASSESSING: frozenset({J.ASSESSING, J.PENDING, J.REPORTING, J.FAILED, J.DEAD,
                            J.SUPERSEDED}),
    J.REPORTING: frozenset({J.REPORTING, J.PENDING, J.DELIVERING, J.FAILED, J.DEAD,
                            J.SUPERSEDED}),
    J.DELIVERING: frozenset({J.DELIVERING, J.DONE, J.FAILED, J.DEAD, J.SUPERSEDED}),
    J.FAILED: _ALL_JOB - {J.DONE},
    J.DEAD: frozenset({J.DEAD, J.PENDING, J.SUPERSEDED}),
    J.DONE: frozenset({J.DONE}),
    J.SUPERSEDED: frozenset({J.SUPERSEDED}),
}
DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    D.PENDING: frozenset({D.PENDING, D.SENT, D.FAILED, D.DEAD}),
    D.SENT: frozenset({D.SENT, D.CONFIRMED, D.FAILED, D.DEAD, D.PENDING}),
    D.FAILED: frozenset({D.FAILED, D.PENDING, D.SENT, D.DEAD}),
    D.DEAD: frozenset({D.DEAD, D.PENDING}),
    D.CONFIRMED: frozenset({D.CONFIRMED}),
}
_FINISHED_JOB = frozenset({J.DONE, J.DEAD, J.SUPERSEDED})


@dataclass(frozen=True)
class JobInfo:
    """One assessment job."""

    id: int
    series_instance_uid: str
    generation: int
    engine_key: str
    state: JobState
    attempts: int
    last_error: str | None
    task_id: str | None
    result_json: str | None
    sr_uid: str | None
    superseded_sr_uid: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    report_path: str | None = None


@dataclass(frozen=True)
class DeliveryInfo:
    """One SR delivery to one destination."""

    id: int
    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    confirmed_by: ConfirmedBy | None
    created_at: dt.datetime
    updated_at: dt.datetime
    sent_at: dt.datetime | None
    confirmed_at: dt.datetime | None
    next_attempt_at: dt.datetime | None


@dataclass(frozen=True)
class FailureInfo:
    """A failed or dead-lettered job or delivery (``destination`` None for a job)."""

    series_instance_uid: str
    job_id: int
    engine_key: str
    destination: str | None
    state: str
    attempts: int
    last_error: str | None
    updated_at: dt.datetime
    #: When a failed delivery is tried again (None: a job, or dead-lettered).
    next_attempt_at: dt.datetime | None = None


_JOB_COLUMNS = (
    Job.id, Series.series_uid, Job.generation, Job.engine_key, Job.state, Job.attempts,
    Job.last_error, Job.task_id, Job.result_json, Job.sr_uid, Job.superseded_sr_uid,
    Job.created_at, Job.updated_at, Job.finished_at, Job.report_path,
)
_DELIVERY_COLUMNS = (
    Delivery.id, Delivery.job_id, Delivery.destination, Delivery.state, Delivery.attempts,
    Delivery.last_error, Delivery.confirmed_by, Delivery.created_at, Delivery.updated_at,
    Delivery.sent_at, Delivery.confirmed_at, Delivery.next_attempt_at,
)


def _job_select() -> Any:
    return select(*_JOB_COLUMNS).join(Series, Series.id == Job.series_id)


def _job_info(row: Any) -> JobInfo:
    values = list(row)
    values[4] = JobState(values[4])
    return JobInfo(*values)


def _delivery_info(row: Any) -> DeliveryInfo:
    values = list(row)
    values[3] = DeliveryState(values[3])
    values[6] = ConfirmedBy(values[6]) if values[6] is not None else None
    return DeliveryInfo(*values)


class JobAPI(SeriesAPI, LedgerBase):
    """Create-or-get, move, fail, dead-letter, list and re-queue jobs and deliveries."""

    # Jobs -------------------------------------------------------------------------
    def create_job(self, series_uid: str, generation: int, engine_key: str) -> JobInfo:
        """The job for ``(series, generation, engine_key)``, created ``pending`` if new."""
        now = utcnow()
        with self._write() as conn:
            series_id = conn.execute(
                select(Series.id).where(Series.series_uid == series_uid)
            ).scalar()
            if series_id is None:
                raise NotFound(f"no series {series_uid}")
            conn.execute(
                self._insert(Job)
                .values(series_id=series_id, generation=generation, engine_key=engine_key,
                        state=J.PENDING.value, attempts=0, created_at=now, updated_at=now)
                .on_conflict_do_nothing()
            )
            row = conn.execute(
                _job_select().where(and_(Job.series_id == series_id,
                                         Job.generation == generation,
                                         Job.engine_key == engine_key))
            ).one()
            return _job_info(row)

    def get_job(self, job_id: int) -> JobInfo:
        """One job (raises :class:`NotFound`)."""
        with self._read() as conn:
            return self._job(conn, job_id)

    def _job(self, conn: Connection, job_id: int) -> JobInfo:
        row = conn.execute(_job_select().where(Job.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return _job_info(row)

    def jobs_of_series(self, series_uid: str) -> list[JobInfo]:
        """Every job of a series, oldest first (all generations: both SRs show)."""
        stmt = _job_select().where(Series.series_uid == series_uid).order_by(Job.id)
        with self._read() as conn:
            return [_job_info(row) for row in conn.execute(stmt)]

    def move_job(
        self, job_id: int, to_state: JobState, *, error: str | None = None,
        task_id: str | None = None, result_json: str | None = None, sr_uid: str | None = None,
        superseded_sr_uid: str | None = None, report_path: str | None = None,
        count_attempt: bool = False,
    ) -> JobInfo:
        """Move a job along :data:`JOB_TRANSITIONS`, recording what is given.

        ``count_attempt`` adds one to ``attempts`` (call it when a stage starts);
        ``error`` becomes ``last_error``. Returns the job as it is afterwards.

        Raises
        ------
        NotFound, InvalidTransition
        """
        now = utcnow()
        with self._write() as conn:
            job = self._job_for_update(conn, job_id)
            if to_state not in JOB_TRANSITIONS[job.state]:
                raise InvalidTransition(f"job {job_id}: {job.state} → {to_state}")
            values: dict[str, Any] = {"state": to_state.value, "updated_at": now}
            given = {"last_error": error, "task_id": task_id, "result_json": result_json,
                     "sr_uid": sr_uid, "superseded_sr_uid": superseded_sr_uid,
                     "report_path": report_path}
            values.update({k: v for k, v in given.items() if v is not None})
            if count_attempt:
                values["attempts"] = Job.attempts + 1
            if to_state in _FINISHED_JOB and job.finished_at is None:
                values["finished_at"] = now
            conn.execute(update(Job).where(Job.id == job_id).values(**values))
            return self._job(conn, job_id)

    def _job_for_update(self, conn: Connection, job_id: int) -> JobInfo:
        row = conn.execute(
            _job_select().where(Job.id == job_id).with_for_update(of=Job)
        ).first()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return _job_info(row)

    def dead_letter_job(self, job_id: int, error: str) -> JobInfo:
        """Give up on a job (``dead``) and mark its series ``failed``; admins re-queue it."""
        job = self.move_job(job_id, J.DEAD, error=error)
        self._fail_series(job, error)
        return job

    def _fail_series(self, job: JobInfo, error: str) -> None:
        info = self.series_info(job.series_instance_uid)
        if info.generation == job.generation and SeriesState.FAILED in (
            SERIES_TRANSITIONS[info.state]
        ):
            self.set_series_state(job.series_instance_uid, SeriesState.FAILED,
                                  generation=job.generation, error=error)

    def previous_sr_uid(self, series_uid: str, generation: int) -> str | None:
        """The SR of the newest earlier generation that produced one (to supersede)."""
        stmt = (
            select(Job.sr_uid)
            .join(Series, Series.id == Job.series_id)
            .where(and_(Series.series_uid == series_uid, Job.generation < generation,
                        Job.sr_uid.is_not(None)))
            .order_by(Job.generation.desc(), Job.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            uid = conn.execute(stmt).scalar()
        return str(uid) if uid is not None else None

    def supersede_older_jobs(self, series_uid: str, generation: int) -> int:
        """Mark unfinished jobs of generations before ``generation`` superseded."""
        unfinished = [s.value for s in JobState if s not in _FINISHED_JOB]
        with self._write() as conn:
            series_id = conn.execute(
                select(Series.id).where(Series.series_uid == series_uid)
            ).scalar()
            result = conn.execute(
                update(Job)
                .where(and_(Job.series_id == series_id, Job.generation < generation,
                            Job.state.in_(unfinished)))
                .values(state=J.SUPERSEDED.value, updated_at=utcnow(), finished_at=utcnow())
            )
            return int(result.rowcount)

    # Deliveries -------------------------------------------------------------------
    def create_delivery(self, job_id: int, destination: str) -> DeliveryInfo:
        """The delivery of ``job_id`` to ``destination``, created ``pending`` if new."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(
                self._insert(Delivery)
                .values(job_id=job_id, destination=destination, state=D.PENDING.value,
                        attempts=0, created_at=now, updated_at=now)
                .on_conflict_do_nothing()
            )
            row = conn.execute(
                select(*_DELIVERY_COLUMNS).where(
                    and_(Delivery.job_id == job_id, Delivery.destination == destination)
                )
            ).one()
            return _delivery_info(row)

    def get_delivery(self, delivery_id: int) -> DeliveryInfo:
        """One delivery (raises :class:`NotFound`)."""
        with self._read() as conn:
            return self._delivery(conn, delivery_id)

    def _delivery(self, conn: Connection, delivery_id: int, lock: bool = False) -> DeliveryInfo:
        stmt = select(*_DELIVERY_COLUMNS).where(Delivery.id == delivery_id)
        row = conn.execute(stmt.with_for_update() if lock else stmt).first()
        if row is None:
            raise NotFound(f"no delivery {delivery_id}")
        return _delivery_info(row)

    def deliveries_of(self, job_id: int) -> list[DeliveryInfo]:
        """The job's deliveries, by destination name."""
        stmt = (select(*_DELIVERY_COLUMNS).where(Delivery.job_id == job_id)
                .order_by(Delivery.destination))
        with self._read() as conn:
            return [_delivery_info(row) for row in conn.execute(stmt)]

    def move_delivery(
        self, delivery_id: int, to_state: DeliveryState, *, error: str | None = None,
        confirmed_by: ConfirmedBy | None = None, next_attempt_at: dt.datetime | None = None,
        count_attempt: bool = False,
    ) -> DeliveryInfo:
        """Move a delivery along :data:`DELIVERY_TRANSITIONS`, recording what is given.

        Raises
        ------
        NotFound, InvalidTransition
        """
        now = utcnow()
        with self._write() as conn:
            current = self._delivery(conn, delivery_id, lock=True)
            if to_state not in DELIVERY_TRANSITIONS[current.state]:
                raise InvalidTransition(
                    f"delivery {delivery_id}: {current.state} → {to_state}")
            values: dict[str, Any] = {"state": to_state.value, "updated_at": now,
                                      "next_attempt_at": next_attempt_at}
            if error is not None:
                values["last_error"] = error
            if confirmed_by is not None:
                values["confirmed_by"] = confirmed_by.value
            if count_attempt:
                values["attempts"] = Delivery.attempts + 1
            if to_state == D.SENT and current.state != D.SENT:
                values["sent_at"] = now
            if to_state == D.CONFIRMED and current.confirmed_at is None:
                values["confirmed_at"] = now
            conn.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))
            return self._delivery(conn, delivery_id)

    # Failures ---------------------------------------------------------------------
    def list_failed(self) -> list[FailureInfo]:
        """Failed and dead-lettered jobs and deliveries, most recent first."""
        bad_jobs = [J.FAILED.value, J.DEAD.value]
        bad_deliveries = [D.FAILED.value, D.DEAD.value]
        jobs = (
            select(Series.series_uid, Job.id, Job.engine_key, Job.state, Job.attempts,
                   Job.last_error, Job.updated_at)
            .join(Series, Series.id == Job.series_id)
            .where(Job.state.in_(bad_jobs))
        )
        deliveries = (
            select(Series.series_uid, Job.id, Job.engine_key, Delivery.destination,
                   Delivery.state, Delivery.attempts, Delivery.last_error, Delivery.updated_at,
                   Delivery.next_attempt_at)
            .join(Job, Job.id == Delivery.job_id)
            .join(Series, Series.id == Job.series_id)
            .where(Delivery.state.in_(bad_deliveries))
        )
        with self._read() as conn:
            found = [FailureInfo(r[0], r[1], r[2], None, *r[3:]) for r in conn.execute(jobs)]
            found += [FailureInfo(*r) for r in conn.execute(deliveries)]
        return sorted(found, key=lambda f: f.updated_at, reverse=True)

    def requeue(self, series_uid: str | None = None) -> list[JobInfo]:
        """Re-queue failed/dead work of the current generation (one series, or all).

        A job that has its assessment result goes back to ``reporting`` (only the
        report and its delivery are redone; its series to ``reporting``), any other to
        ``pending`` (its series to ``queued``). Failed/dead deliveries go back to
        ``pending``; attempts reset to zero (the error is kept). Returns the re-queued
        jobs, for the pipeline to dispatch.
        """
        now = utcnow()
        bad = [J.FAILED.value, J.DEAD.value]
        stmt = (
            select(Job.id, Series.series_uid, Job.result_json.is_not(None))
            .join(Series, Series.id == Job.series_id)
            .where(and_(Job.generation == Series.generation, Job.state.in_(bad)))
        )
        if series_uid is not None:
            stmt = stmt.where(Series.series_uid == series_uid)
        with self._write() as conn:
            targets = list(conn.execute(stmt))
            ids = [int(r[0]) for r in targets]
            for assessed, state in ((True, J.REPORTING), (False, J.PENDING)):
                chosen = [int(r[0]) for r in targets if bool(r[2]) is assessed]
                if chosen:
                    conn.execute(update(Job).where(Job.id.in_(chosen))
                                 .values(state=state.value, attempts=0, updated_at=now,
                                         finished_at=None))
            if ids:
                conn.execute(update(Delivery)
                             .where(and_(Delivery.job_id.in_(ids),
                                         Delivery.state.in_([D.FAILED.value, D.DEAD.value])))
                             .values(state=D.PENDING.value, attempts=0, updated_at=now,
                                     next_attempt_at=None))
        for uid, assessed in sorted({(str(r[1]), bool(r[2])) for r in targets}):
            if self.series_info(uid).state == SeriesState.FAILED:
                self.set_series_state(uid, SeriesState.REPORTING if assessed
                                      else SeriesState.QUEUED, detail="re-queued")
        return [self.get_job(i) for i in ids]
