"""Series state: completion queries, the state machine, history and listings."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Connection, and_, func, select, update
from sqlalchemy.sql.expression import Exists

from node.ledger.base import InvalidTransition, LedgerBase, NotFound
from node.ledger.models import (
    Association,
    Instance,
    Series,
    SeriesAssociation,
    SeriesEvent,
    SeriesState,
    Study,
    utcnow,
)

S = SeriesState
#: Allowed series transitions. Re-opening (any state → RECEIVING, generation + 1) is
#: done only by ``record_instance``; closing (RECEIVING → COMPLETE/IGNORED) by
#: ``close_series``. Between the pipeline stages a step may be repeated or redone
#: (a redelivered or retried task); DELIVERED is left only by an explicit re-queue.
SERIES_TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    S.RECEIVING: frozenset({S.COMPLETE, S.IGNORED}),
    S.COMPLETE: frozenset({S.COMPLETE, S.QUEUED, S.IGNORED, S.FAILED}),
    S.QUEUED: frozenset({S.QUEUED, S.ASSESSING, S.REPORTING, S.FAILED}),
    S.ASSESSING: frozenset({S.ASSESSING, S.QUEUED, S.REPORTING, S.FAILED}),
    S.REPORTING: frozenset({S.REPORTING, S.QUEUED, S.ASSESSING, S.DELIVERED, S.FAILED}),
    S.DELIVERED: frozenset({S.DELIVERED, S.QUEUED}),
    S.FAILED: frozenset({S.FAILED, S.QUEUED, S.ASSESSING, S.REPORTING}),
    S.IGNORED: frozenset({S.IGNORED, S.QUEUED}),
}


@dataclass(frozen=True)
class SeriesInfo:
    """A series as the ledger knows it."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    description: str
    rule: str
    action: str
    state: SeriesState
    instance_count: int
    generation: int
    reopen_count: int
    first_instance_at: dt.datetime
    generation_started_at: dt.datetime
    last_instance_at: dt.datetime
    closed_at: dt.datetime | None
    close_trigger: str | None
    state_changed_at: dt.datetime
    last_error: str | None


@dataclass(frozen=True)
class OpenSeries:
    """A series still receiving, as the completion monitor sees it."""

    series_instance_uid: str
    rule: str
    action: str
    generation: int
    generation_started_at: dt.datetime
    last_instance_at: dt.datetime
    busy: bool  # an association that delivered to it is still open


@dataclass(frozen=True)
class SeriesEventInfo:
    """One entry of a series' history."""

    at: dt.datetime
    generation: int
    kind: str
    from_state: str | None
    to_state: str | None
    detail: str | None
    job_id: int | None
    sr_uid: str | None


def _busy_clause() -> Exists:
    return (
        select(SeriesAssociation.series_id)
        .join(Association, Association.id == SeriesAssociation.assoc_id)
        .where(and_(SeriesAssociation.series_id == Series.id, Association.closed_at.is_(None)))
        .exists()
    )


_SERIES_COLUMNS = (
    Series.series_uid, Study.study_uid, Series.modality, Series.description, Series.rule,
    Series.action, Series.state, Series.instance_count, Series.generation,
    Series.reopen_count, Series.first_instance_at, Series.generation_started_at,
    Series.last_instance_at, Series.closed_at, Series.close_trigger,
    Series.state_changed_at, Series.last_error,
)


def _series_info(row: tuple[object, ...]) -> SeriesInfo:
    values = list(row)
    values[6] = SeriesState(str(values[6]))
    return SeriesInfo(*values)  # type: ignore[arg-type]


class SeriesAPI(LedgerBase):
    """Reading series and moving them through :data:`SERIES_TRANSITIONS`."""

    def open_series(self) -> list[OpenSeries]:
        """Every series in ``receiving``, with whether an association still feeds it."""
        stmt = select(
            Series.series_uid, Series.rule, Series.action, Series.generation,
            Series.generation_started_at, Series.last_instance_at, _busy_clause(),
        ).where(Series.state == S.RECEIVING.value)
        with self._read() as conn:
            return [OpenSeries(*row) for row in conn.execute(stmt)]

    def close_series(
        self, series_uid: str, generation: int, trigger: str, *,
        quiet_since: dt.datetime | None = None, ignore: bool = False,
    ) -> bool:
        """Close a receiving series (to COMPLETE, or IGNORED when ``ignore``).

        The checks are part of the UPDATE, so they hold at the moment of closing:
        the series is still ``receiving`` in ``generation``, and with ``quiet_since``
        no instance arrived after it and no association that fed it is open.
        Returns False (and changes nothing) when a check fails.
        """
        with self._write() as conn:
            return self._close_series_in(conn, series_uid, generation, trigger,
                                         quiet_since=quiet_since, ignore=ignore) is not None

    def _close_series_in(
        self, conn: Connection, series_uid: str, generation: int, trigger: str, *,
        quiet_since: dt.datetime | None = None, ignore: bool = False,
    ) -> int | None:
        """:meth:`close_series` inside the caller's transaction; the series' row id."""
        conditions = [
            Series.series_uid == series_uid,
            Series.state == S.RECEIVING.value,
            Series.generation == generation,
        ]
        if quiet_since is not None:
            conditions += [Series.last_instance_at <= quiet_since, ~_busy_clause()]
        to_state = S.IGNORED if ignore else S.COMPLETE
        now = utcnow()
        result = conn.execute(
            update(Series)
            .where(and_(*conditions))
            .values(state=to_state.value, closed_at=now, close_trigger=trigger,
                    state_changed_at=now)
            .returning(Series.id)
        ).first()
        if result is None:
            return None
        series_id = int(result[0])
        self._event(conn, series_id, now, generation, "closed", S.RECEIVING, to_state, trigger)
        return series_id

    def set_series_state(
        self, series_uid: str, to_state: SeriesState, *, generation: int | None = None,
        detail: str | None = None, error: str | None = None,
    ) -> bool:
        """Move a series to ``to_state`` (checked against :data:`SERIES_TRANSITIONS`).

        With ``generation``, nothing happens (False) if the series has moved on to
        another generation meanwhile (late instances re-opened it): the caller's work
        is stale. ``error`` is kept as the series' last error.

        Raises
        ------
        NotFound
            No such series.
        InvalidTransition
            The state machine does not allow the change.
        """
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                select(Series.id, Series.state, Series.generation)
                .where(Series.series_uid == series_uid)
                .with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"no series {series_uid}")
            if generation is not None and row.generation != generation:
                return False
            current = S(row.state)
            if to_state not in SERIES_TRANSITIONS[current]:
                raise InvalidTransition(f"series {series_uid}: {current} → {to_state}")
            values: dict[str, object] = {"state": to_state.value, "state_changed_at": now}
            if error is not None:
                values["last_error"] = error
            conn.execute(update(Series).where(Series.id == row.id).values(**values))
            if current != to_state:
                self._event(conn, int(row.id), now, int(row.generation), "state", current,
                            to_state, detail or error)
            return True

    def add_series_event(
        self, series_uid: str, kind: str, *, detail: str | None = None,
        job_id: int | None = None, sr_uid: str | None = None,
    ) -> None:
        """Append a free-form entry (e.g. ``sr_sent``, ``sr_superseded``) to the history."""
        with self._write() as conn:
            row = conn.execute(
                select(Series.id, Series.generation).where(Series.series_uid == series_uid)
            ).first()
            if row is None:
                raise NotFound(f"no series {series_uid}")
            self._event(conn, int(row.id), utcnow(), int(row.generation), kind, None, None,
                        detail, job_id=job_id, sr_uid=sr_uid)

    def _event(
        self, conn: Connection, series_id: int, at: dt.datetime, generation: int, kind: str,
        from_state: SeriesState | None, to_state: SeriesState | None, detail: str | None,
        *, job_id: int | None = None, sr_uid: str | None = None,
    ) -> None:
        conn.execute(
            self._insert(SeriesEvent).values(
                series_id=series_id, at=at, generation=generation, kind=kind,
                from_state=from_state.value if from_state else None,
                to_state=to_state.value if to_state else None, detail=detail,
                job_id=job_id, sr_uid=sr_uid,
            )
        )

    def series_info(self, series_uid: str) -> SeriesInfo:
        """One series (raises :class:`NotFound`)."""
        stmt = (
            select(*_SERIES_COLUMNS)
            .join(Study, Study.id == Series.study_id)
            .where(Series.series_uid == series_uid)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            raise NotFound(f"no series {series_uid}")
        return _series_info(tuple(row))

    def list_series(
        self, *, states: tuple[SeriesState, ...] = (), limit: int | None = None
    ) -> list[SeriesInfo]:
        """Series, most recently changed first, optionally only in ``states``."""
        stmt = select(*_SERIES_COLUMNS).join(Study, Study.id == Series.study_id)
        if states:
            stmt = stmt.where(Series.state.in_([s.value for s in states]))
        stmt = stmt.order_by(Series.state_changed_at.desc(), Series.id.desc()).limit(limit)
        with self._read() as conn:
            return [_series_info(tuple(row)) for row in conn.execute(stmt)]

    def series_counts(self) -> dict[SeriesState, int]:
        """How many series are in each state (every state present, zero if none)."""
        stmt = select(Series.state, func.count()).group_by(Series.state)
        with self._read() as conn:
            found = {S(state): int(n) for state, n in conn.execute(stmt)}
        return {state: found.get(state, 0) for state in S}

    def series_history(self, series_uid: str) -> list[SeriesEventInfo]:
        """The series' events, oldest first."""
        stmt = (
            select(SeriesEvent.at, SeriesEvent.generation, SeriesEvent.kind,
                   SeriesEvent.from_state, SeriesEvent.to_state, SeriesEvent.detail,
                   SeriesEvent.job_id, SeriesEvent.sr_uid)
            .join(Series, Series.id == SeriesEvent.series_id)
            .where(Series.series_uid == series_uid)
            .order_by(SeriesEvent.id)
        )
        with self._read() as conn:
            return [SeriesEventInfo(*row) for row in conn.execute(stmt)]

    def instance_relpaths(self, series_uid: str) -> list[str]:
        """Spool paths of the newest version of each instance of a series."""
        newest = (
            select(Instance.sop_uid, func.max(Instance.version).label("v"))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == series_uid)
            .group_by(Instance.sop_uid)
            .subquery()
        )
        stmt = (
            select(Instance.relpath)
            .join(newest, and_(Instance.sop_uid == newest.c.sop_uid,
                               Instance.version == newest.c.v))
            .order_by(Instance.relpath)
        )
        with self._read() as conn:
            return [str(p) for p in conn.execute(stmt).scalars()]
