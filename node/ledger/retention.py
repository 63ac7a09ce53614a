"""Retention: which series may be deleted, and deleting their instance rows.

A purge has two steps so that a crash between them is resumed, never half-forgotten:
:meth:`RetentionAPI.begin_purge` moves the series to ``purging`` (only if it is still in
the state and generation the caller saw) and returns its files; the caller deletes
them; :meth:`RetentionAPI.finish_purge` deletes the instance rows and the links to
associations (and associations left with no series) and moves the series to
``purged``. The series row, its jobs, deliveries and history stay: they are small,
and keep the generation counter that SR UIDs derive from (a series re-sent after a
purge re-opens as a new generation and its SR supersedes the earlier one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, and_, delete, func, select, update

from node.ledger.base import LedgerBase
from node.ledger.models import (
    Association,
    Instance,
    Job,
    JobState,
    Series,
    SeriesAssociation,
    SeriesEvent,
    SeriesState,
    Study,
    utcnow,
)

S = SeriesState


@dataclass(frozen=True)
class PurgeCandidate:
    """A series retention may delete: its files (every version) and their bytes."""

    series_instance_uid: str
    study_instance_uid: str
    state: SeriesState
    generation: int
    since: dt.datetime  # when it entered ``state``
    files: int
    size: int


@dataclass(frozen=True)
class KeptReport:
    """A finished job's report files (SR under ``report_path``, companions beside it)."""

    job_id: int
    series_instance_uid: str
    generation: int
    engine_key: str
    report_path: str


class RetentionAPI(LedgerBase):
    """Candidates, the two-step purge, and spool paths by series (start-up)."""

    def purge_candidates(
        self, states: Iterable[SeriesState], *, before: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[PurgeCandidate]:
        """Series in ``states`` (entered at or before ``before``), oldest first."""
        # Counted per listed series (index on instances.series_id), not over the table.
        of_series = Instance.series_id == Series.id
        count = select(func.count()).where(of_series).scalar_subquery()
        size = select(func.coalesce(func.sum(Instance.size), 0)).where(of_series)
        stmt = (
            select(Series.series_uid, Study.study_uid, Series.state, Series.generation,
                   Series.state_changed_at, count, size.scalar_subquery())
            .join(Study, Study.id == Series.study_id)
            .where(Series.state.in_([s.value for s in states]))
            .order_by(Series.state_changed_at, Series.id)
            .limit(limit)
        )
        if before is not None:
            stmt = stmt.where(Series.state_changed_at <= before)
        with self._read() as conn:
            return [PurgeCandidate(str(uid), str(study), S(state), int(gen), since,
                                   int(n), int(size))
                    for uid, study, state, gen, since, n, size in conn.execute(stmt)]

    def begin_purge(self, series_uid: str, generation: int, state: SeriesState
                    ) -> list[tuple[str, int]] | None:
        """Mark the series ``purging`` if it is still in ``state`` and ``generation``;
        its files ``(spool relpath, size)``, or None (it changed: leave it alone)."""
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                update(Series)
                .where(and_(Series.series_uid == series_uid, Series.state == state.value,
                            Series.generation == generation))
                .values(state=S.PURGING.value, state_changed_at=now)
                .returning(Series.id)
            ).first()
            if row is None:
                return None
            series_id = int(row[0])
            if state != S.PURGING:
                self._purge_event(conn, series_id, now, generation, state, S.PURGING, None)
            return [(str(p), int(n)) for p, n in conn.execute(
                select(Instance.relpath, Instance.size).where(Instance.series_id == series_id)
                .order_by(Instance.relpath))]

    def finish_purge(self, series_uid: str, detail: str) -> bool:
        """Delete a ``purging`` series' instance rows and association links; ``purged``.

        False when the series is not ``purging`` (nothing changed).
        """
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                select(Series.id, Series.generation)
                .where(and_(Series.series_uid == series_uid,
                            Series.state == S.PURGING.value))
                .with_for_update()
            ).first()
            if row is None:
                return False
            series_id, generation = int(row[0]), int(row[1])
            conn.execute(delete(Instance).where(Instance.series_id == series_id))
            assoc_ids = [str(a) for a in conn.execute(
                select(SeriesAssociation.assoc_id)
                .where(SeriesAssociation.series_id == series_id)).scalars()]
            conn.execute(delete(SeriesAssociation)
                         .where(SeriesAssociation.series_id == series_id))
            if assoc_ids:
                linked = select(SeriesAssociation.assoc_id).where(
                    SeriesAssociation.assoc_id == Association.id).exists()
                conn.execute(delete(Association).where(
                    and_(Association.id.in_(assoc_ids), Association.closed_at.is_not(None),
                         ~linked)))
            conn.execute(update(Series).where(Series.id == series_id).values(
                state=S.PURGED.value, instance_count=0, state_changed_at=now))
            self._purge_event(conn, series_id, now, generation, S.PURGING, S.PURGED, detail)
            return True

    def _purge_event(self, conn: Connection, series_id: int, at: dt.datetime,
                     generation: int, from_state: SeriesState, to_state: SeriesState,
                     detail: str | None) -> None:
        conn.execute(self._insert(SeriesEvent).values(
            series_id=series_id, at=at, generation=generation, kind="retention",
            from_state=from_state.value, to_state=to_state.value, detail=detail))

    def series_relpaths(self, series_uids: Iterable[str]) -> set[str]:
        """Spool paths of every recorded version of the instances of these series."""
        uids = sorted(set(series_uids))
        found: set[str] = set()
        with self._read() as conn:
            for start in range(0, len(uids), 500):
                stmt = (select(Instance.relpath)
                        .join(Series, Series.id == Instance.series_id)
                        .where(Series.series_uid.in_(uids[start:start + 500])))
                found.update(str(p) for p in conn.execute(stmt).scalars())
        return found

    def open_series_dirs(self) -> set[tuple[str, str]]:
        """``(study UID, series UID)`` of every series still receiving."""
        stmt = (select(Study.study_uid, Series.series_uid)
                .join(Study, Study.id == Series.study_id)
                .where(Series.state == S.RECEIVING.value))
        with self._read() as conn:
            return {(str(a), str(b)) for a, b in conn.execute(stmt)}

    def expired_reports(self, before: dt.datetime) -> list[KeptReport]:
        """Reports of jobs ``done`` or ``superseded`` at or before ``before``, oldest first
        (a ``dead`` job may be re-queued, and its report is then sent)."""
        stmt = (
            select(Job.id, Series.series_uid, Job.generation, Job.engine_key,
                   Job.report_path)
            .join(Series, Series.id == Job.series_id)
            .where(and_(Job.state.in_([JobState.DONE.value, JobState.SUPERSEDED.value]),
                        Job.finished_at <= before, Job.report_path.is_not(None)))
            .order_by(Job.finished_at, Job.id)
        )
        with self._read() as conn:
            return [KeptReport(int(i), str(u), int(g), str(k), str(p))
                    for i, u, g, k, p in conn.execute(stmt)]

    def forget_report(self, job_id: int) -> None:
        """The job's report files were deleted: clear its ``report_path``."""
        with self._write() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(report_path=None))
