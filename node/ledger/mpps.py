"""Modality Performed Procedure Steps in the ledger (PS3.4 Annex F.7).

The MPPS SCP (:mod:`node.receive.mpps`) records each step's N-CREATE and N-SET here
(:meth:`MppsAPI.mpps_create`, :meth:`MppsAPI.mpps_set`); a step survives a restart, so
its N-SET may arrive after one. The completion monitor asks :meth:`MppsAPI.mpps_due`
which receiving series an ended step (COMPLETED or DISCONTINUED) lets it close now and
closes them with :meth:`MppsAPI.close_series_by_mpps` (triggers
:data:`TRIGGER_MPPS_COMPLETED`, :data:`TRIGGER_MPPS_DISCONTINUED`).

A series an ended step references in its Performed Series Sequence (0040,0340) is due
once every instance the step lists for it — Referenced Image Sequence (0008,1140) and
Referenced Non-Image Composite SOP Instance Sequence (0040,0220) of the item — is in
the ledger; when the step lists none, once no association that delivered to it is still
open. Until then the quiet period still applies. A reference to a series the node never
receives stays pending and closes nothing. When a step ends after its series was
already closed (the quiet period came first) with everything it lists received, the
reference is settled as ``already_closed``.

Only UIDs, the status and the calling AE are kept: never a patient attribute.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Connection, and_, delete, insert, select, update

from node.ledger.models import Instance, MppsSeries, MppsStep, Series, SeriesState, utcnow
from node.ledger.series import SeriesAPI, _busy_clause

#: Performed Procedure Step Status (0040,0252) defined terms (PS3.3 C.4.14).
PPS_IN_PROGRESS = "IN PROGRESS"
PPS_COMPLETED = "COMPLETED"
PPS_DISCONTINUED = "DISCONTINUED"
PPS_STATUSES = (PPS_IN_PROGRESS, PPS_COMPLETED, PPS_DISCONTINUED)
#: Final states: the step may no longer be updated (PS3.4 F.7.2.2.2).
PPS_FINAL = (PPS_COMPLETED, PPS_DISCONTINUED)
TRIGGER_MPPS_COMPLETED = "mpps_completed"
TRIGGER_MPPS_DISCONTINUED = "mpps_discontinued"
TRIGGERS = {PPS_COMPLETED: TRIGGER_MPPS_COMPLETED, PPS_DISCONTINUED: TRIGGER_MPPS_DISCONTINUED}
#: Outcome of a reference whose series was already closed when the step ended.
OUTCOME_ALREADY_CLOSED = "already_closed"


@dataclass(frozen=True)
class PerformedSeries:
    """One item of a step's Performed Series Sequence: the series and what it lists."""

    series_uid: str
    sop_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class PerformedSeriesInfo:
    """A step's reference to a series and how it was applied (``outcome`` None: pending)."""

    series_uid: str
    sop_uids: tuple[str, ...]
    outcome: str | None
    done_at: dt.datetime | None


@dataclass(frozen=True)
class MppsStepInfo:
    """A step as the ledger knows it."""

    sop_uid: str
    status: str
    calling_ae: str
    created_at: dt.datetime
    updated_at: dt.datetime
    ended_at: dt.datetime | None
    series: tuple[PerformedSeriesInfo, ...]


class StepChange(StrEnum):
    """What :meth:`MppsAPI.mpps_set` did."""

    UPDATED = "updated"
    NO_SUCH_STEP = "no_such_step"
    FINAL = "final"  # the step is COMPLETED or DISCONTINUED: it may no longer be updated


@dataclass(frozen=True)
class MppsDue:
    """A receiving series that ended steps let the completion monitor close now."""

    series_uid: str
    trigger: str
    step_ids: tuple[int, ...]
    step_uids: tuple[str, ...]


class MppsAPI(SeriesAPI):
    """Steps, their series references, and closing series by them."""

    def mpps_create(self, sop_uid: str, calling_ae: str, status: str,
                    series: Sequence[PerformedSeries] = ()) -> bool:
        """Record a new step (N-CREATE); False (nothing changed) if it exists already."""
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                self._insert(MppsStep).values(
                    sop_uid=sop_uid, status=status, calling_ae=calling_ae, created_at=now,
                    updated_at=now, ended_at=now if status in PPS_FINAL else None,
                ).on_conflict_do_nothing().returning(MppsStep.id)
            ).first()
            if row is None:
                return False
            _insert_refs(conn, int(row[0]), series)
            return True

    def mpps_set(self, sop_uid: str, status: str | None,
                 series: Sequence[PerformedSeries] | None) -> StepChange:
        """Apply an N-SET: a new status (None: unchanged), a new Performed Series
        Sequence (None: unchanged; N-SET replaces the whole sequence, PS3.7 10.1.1).

        A step already COMPLETED or DISCONTINUED is not changed (:attr:`StepChange.FINAL`).
        """
        now = utcnow()
        with self._write() as conn:
            row = conn.execute(
                select(MppsStep.id, MppsStep.status).where(MppsStep.sop_uid == sop_uid)
                .with_for_update()
            ).first()
            if row is None:
                return StepChange.NO_SUCH_STEP
            if row.status in PPS_FINAL:
                return StepChange.FINAL
            step_id, new_status = int(row.id), status or str(row.status)
            values: dict[str, object] = {"status": new_status, "updated_at": now}
            if new_status in PPS_FINAL:
                values["ended_at"] = now
            conn.execute(update(MppsStep).where(MppsStep.id == step_id).values(**values))
            if series is not None:
                conn.execute(delete(MppsSeries).where(MppsSeries.step_id == step_id))
                _insert_refs(conn, step_id, series)
            if new_status in PPS_FINAL:
                _settle_closed(conn, step_id, now)
            return StepChange.UPDATED

    def mpps_step(self, sop_uid: str) -> MppsStepInfo | None:
        """One step with its series references, or None."""
        with self._read() as conn:
            s = conn.execute(
                select(MppsStep.id, MppsStep.sop_uid, MppsStep.status, MppsStep.calling_ae,
                       MppsStep.created_at, MppsStep.updated_at, MppsStep.ended_at)
                .where(MppsStep.sop_uid == sop_uid)
            ).first()
            if s is None:
                return None
            refs = conn.execute(
                select(MppsSeries.series_uid, MppsSeries.sop_uids, MppsSeries.outcome,
                       MppsSeries.done_at)
                .where(MppsSeries.step_id == s.id).order_by(MppsSeries.series_uid)
            ).all()
        return MppsStepInfo(
            s.sop_uid, s.status, s.calling_ae, s.created_at, s.updated_at, s.ended_at,
            tuple(PerformedSeriesInfo(r.series_uid, tuple(json.loads(r.sop_uids)),
                                      r.outcome, r.done_at) for r in refs),
        )

    def mpps_due(self) -> dict[str, MppsDue]:
        """Receiving series that ended steps let the monitor close now, by Series UID."""
        stmt = (
            select(MppsSeries.series_uid, MppsSeries.step_id, MppsStep.sop_uid,
                   MppsStep.status, MppsSeries.sop_uids, Series.id, _busy_clause())
            .select_from(MppsSeries)
            .join(MppsStep, MppsStep.id == MppsSeries.step_id)
            .join(Series, Series.series_uid == MppsSeries.series_uid)
            .where(and_(MppsStep.status.in_(PPS_FINAL), MppsSeries.done_at.is_(None),
                        Series.state == SeriesState.RECEIVING.value))
        )
        ready: dict[str, list[tuple[int, str, str]]] = {}
        with self._read() as conn:
            for uid, step_id, step_uid, status, listed, series_id, busy in conn.execute(stmt):
                if _ready(conn, int(series_id), listed, bool(busy)):
                    ready.setdefault(str(uid), []).append((int(step_id), str(step_uid),
                                                           str(status)))
        due = {}
        for uid, steps in ready.items():
            status = PPS_COMPLETED if any(s == PPS_COMPLETED for *_, s in steps) \
                else PPS_DISCONTINUED
            due[uid] = MppsDue(uid, TRIGGERS[status], tuple(i for i, _, _ in steps),
                               tuple(u for _, u, _ in steps))
        return due

    def close_series_by_mpps(self, due: MppsDue, generation: int, *,
                             ignore: bool = False) -> bool:
        """Close a receiving series because of ended steps (see :meth:`mpps_due`).

        The series' history gets the trigger and one ``mpps`` entry per step (its SOP
        Instance UID); the steps' references are settled with the trigger as outcome.
        False (nothing changed) if the series is no longer receiving in ``generation``.
        """
        now = utcnow()
        with self._write() as conn:
            series_id = self._close_series_in(conn, due.series_uid, generation, due.trigger,
                                              ignore=ignore)
            if series_id is None:
                return False
            conn.execute(
                update(MppsSeries)
                .where(and_(MppsSeries.series_uid == due.series_uid,
                            MppsSeries.step_id.in_(due.step_ids)))
                .values(outcome=due.trigger, done_at=now)
            )
            for step_uid in due.step_uids:
                self._event(conn, series_id, now, generation, "mpps", None, None,
                            f"step {step_uid}")
            return True


def _insert_refs(conn: Connection, step_id: int, series: Sequence[PerformedSeries]) -> None:
    merged: dict[str, list[str]] = {}
    for item in series:  # a series listed twice: one reference with both lists
        merged.setdefault(item.series_uid, []).extend(item.sop_uids)
    for series_uid, sop_uids in merged.items():
        conn.execute(insert(MppsSeries).values(
            step_id=step_id, series_uid=series_uid,
            sop_uids=json.dumps(sorted(set(sop_uids))), outcome=None, done_at=None))


def _ready(conn: Connection, series_id: int, listed: str, busy: bool) -> bool:
    """Every instance listed is in the ledger; or nothing listed and no sender open."""
    wanted = set(json.loads(listed))
    if not wanted:
        return not busy
    received = set(conn.scalars(
        select(Instance.sop_uid).where(Instance.series_id == series_id).distinct()))
    return wanted <= received


def _settle_closed(conn: Connection, step_id: int, now: dt.datetime) -> None:
    """Settle the references of an ended step whose series is already closed and whole."""
    rows = conn.execute(
        select(MppsSeries.series_uid, MppsSeries.sop_uids, Series.id)
        .join(Series, Series.series_uid == MppsSeries.series_uid)
        .where(and_(MppsSeries.step_id == step_id, MppsSeries.done_at.is_(None),
                    Series.state != SeriesState.RECEIVING.value))
    ).all()
    for uid, listed, series_id in rows:
        if _ready(conn, int(series_id), listed, busy=False):
            conn.execute(
                update(MppsSeries)
                .where(and_(MppsSeries.step_id == step_id, MppsSeries.series_uid == uid))
                .values(outcome=OUTCOME_ALREADY_CLOSED, done_at=now)
            )
