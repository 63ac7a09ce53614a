"""Applying the receive journal: spool files and ledger rows from committed records.

The listener acknowledges a C-STORE once its data set is durable in the journal
(:mod:`node.store.journal`). One applier thread then, in the order the records were committed:

1. copies the data set out of the journal into ``<home>/tmp`` (``copy_file_range``) and
   moves it into the spool under its version (identical bytes: no second copy,
   different bytes: the next version — :meth:`node.store.spool.Spool.store`), without a
   flush of its own;
2. records the batch in the ledger with one commit (:meth:`Ledger.record_instances`);
3. at a checkpoint — a segment closed and every record in it applied — flushes the
   spool's filesystem once (``syncfs``) and only then marks the segment free for reuse.

The applier stays out of the way of senders: on a 2-core machine its CPU (hashing,
copying, ledger rows) competes with the receive path a modality is waiting on.
It applies when no record was committed for :data:`APPLY_QUIET` seconds, when its
oldest record waited :data:`MAX_DEFER` seconds, or when the journal runs short of free
segments, and when the last open association ends (:meth:`Applier.after` with
``hurry``): a series sent alone then completes without waiting; with many senders, the
first ones to finish do not pull the applier's work in among the others' transfers.

After a crash, the segments not yet freed are replayed at start-up (before the listener
accepts associations and before the completion monitor looks at open series);
re-applying a record is harmless (same bytes → same version, recording the same row
again does nothing), and files a crash left renamed but unflushed are verified and
replaced. An association's end is recorded in the ledger only after its records were
applied (:meth:`Applier.after`), so the completion monitor never sees a released
association whose images are still on their way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from node.ledger.instances import InstanceRecord
from node.logs import get_logger
from node.receive.dicomio import InstanceHeader
from node.redact import error_text
from node.store.journal import Entry, Journal, Segment
from node.store.spool import Spool, Stored

log = get_logger(__name__)

#: Records applied per ledger commit at most.
BATCH = 256
#: Closed, fully applied segments that trigger a checkpoint, at least (or a quarter of
#: the journal; also: the pool runs low, or nothing arrived for IDLE_CHECKPOINT seconds).
CHECKPOINT_SEGMENTS = 4
IDLE_CHECKPOINT = 0.5
#: Wait after a failed batch (ledger unreachable, spool disk full) before retrying it.
RETRY_SECONDS = 1.0
#: Apply once no record was committed for this long (senders are idle)…
APPLY_QUIET = 0.05
#: …or once the oldest queued record waited this long…
MAX_DEFER = 2.0
#: …or once this few free journal segments are left.
LOW_SEGMENTS = 3
#: ``<home>/journal/state.json`` (read by ``qcnode status``) is rewritten at most this often.
STATE_EVERY = 1.0
STATE_FILE = "state.json"


class RecordingLedger(Protocol):
    """The part of :class:`node.ledger.Ledger` the applier uses."""

    def versions_of(self, sop_instance_uid: str) -> list[tuple[int, str]]: ...
    def record_instances(self, recs: Sequence[InstanceRecord]) -> list[Exception | None]: ...


def entry_meta(header: InstanceHeader, calling_ae: str, assoc_id: str, action: str,
               rule: str) -> dict[str, Any]:
    """What a journal record carries besides the data set (UIDs only, no PHI)."""
    return {
        "sop": header.sop_instance_uid, "class": header.sop_class_uid,
        "study": header.study_instance_uid, "series": header.series_instance_uid,
        "modality": header.modality, "desc": header.series_description,
        "ts": header.transfer_syntax_uid, "ae": calling_ae, "assoc": assoc_id,
        "action": action, "rule": rule, "t": time.time_ns(),
    }


def header_from_meta(meta: dict[str, Any]) -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=str(meta["sop"]), sop_class_uid=str(meta["class"]),
        study_instance_uid=str(meta["study"]), series_instance_uid=str(meta["series"]),
        modality=str(meta["modality"]), series_description=str(meta["desc"]),
        transfer_syntax_uid=str(meta["ts"]),
    )


def instance_record(
    header: InstanceHeader, stored: Stored, calling_ae: str, assoc_id: str, action: str,
    rule: str, received_at: dt.datetime | None = None,
) -> InstanceRecord:
    """The ledger row for a stored instance."""
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid, modality=header.modality,
        series_description=header.series_description,
        transfer_syntax_uid=header.transfer_syntax_uid, relpath=stored.relpath,
        size=stored.size, sha256=stored.sha256, calling_ae=calling_ae, assoc_id=assoc_id,
        version=stored.version, action=action if action in ("assess", "store") else "assess",
        rule=rule, received_at=received_at,
    )


class Applier:
    """The journal's single consumer (see the module documentation)."""

    def __init__(self, journal: Journal, spool: Spool, ledger: RecordingLedger | None) -> None:
        self.journal, self.spool, self.ledger = journal, spool, ledger
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, Entry, float]] = deque()
        self._after: list[tuple[int, Callable[[], None]]] = []
        self._urgent = 0  # apply up to this ticket now (see after)
        self._last_submit = 0.0
        self._issued = 0
        self._applied = 0
        self._stopping = False
        self._failing = False  # the last batch failed (spool full, ledger down): retrying
        self._last_error: str | None = None
        self._inflight: tuple[int, float] = (0, 0.0)  # records being applied, oldest's time
        self._published = (0.0, -1, False)
        self._thread: threading.Thread | None = None
        #: Held while a batch is applied: retention deletes a series under it, so no
        #: instance of that series is stored or recorded meanwhile (node.store.retention).
        self.apply_lock = threading.Lock()
        #: (study, series) UIDs of the records in each segment not yet retired.
        self._pins: dict[Segment, set[tuple[str, str]]] = {}
        #: (study, series) UIDs of the records replayed by :meth:`recover`.
        self.replayed: set[tuple[str, str]] = set()

    # Producers ---------------------------------------------------------------------
    def submit(self, entry: Entry) -> int:
        """Queue a committed record; returns its ticket for :meth:`wait`."""
        now = time.monotonic()
        with self._cond:
            self._issued += 1
            self._queue.append((self._issued, entry, now))
            self._pin(entry)
            self._last_submit = now
            if len(self._queue) == 1 or self.journal.free_count() < LOW_SEGMENTS:
                self._cond.notify_all()
            return self._issued

    def after(self, ticket: int, action: Callable[[], None], *, hurry: bool = False) -> None:
        """Run ``action`` once the record with ``ticket`` (and all before it) was
        applied: now, in the caller's thread, if it already was; else in the applier's
        thread. ``hurry``: apply up to ``ticket`` now rather than when senders pause.
        Actions still waiting when the node stops are dropped (their records are
        replayed at the next start)."""
        with self._cond:
            if ticket > self._applied:
                self._after.append((ticket, action))
                if hurry:
                    self._urgent = max(self._urgent, ticket)
                    self._cond.notify_all()
                return
        _run_action(action)

    def _pin(self, entry: Entry) -> None:
        """Remember the record's series until its segment is retired (under _cond)."""
        key = (str(entry.meta["study"]), str(entry.meta["series"]))
        self._pins.setdefault(entry.segment, set()).add(key)

    def pinned_series(self) -> frozenset[str]:
        """Series UIDs with a record in the journal that is not yet retired: queued
        (acknowledged, not applied) or applied but not yet flushed. A crash would
        replay such a record, so retention must not delete the series."""
        with self._cond:
            return frozenset(series for keys in self._pins.values() for _, series in keys)

    def _run_due(self) -> None:
        with self._cond:
            due = [action for ticket, action in self._after if ticket <= self._applied]
            self._after = [item for item in self._after if item[0] > self._applied]
        for action in due:
            _run_action(action)

    @property
    def failing(self) -> bool:
        """The last batch failed and is being retried (spool disk full, ledger down)."""
        with self._cond:
            return self._failing

    def publish(self, *, force: bool = False) -> None:
        """Write what waits in the journal to ``state.json`` for ``qcnode status``."""
        now = time.monotonic()
        with self._cond:
            inflight, since = self._inflight
            waiting = len(self._queue) + inflight
            first = since if inflight else (self._queue[0][2] if self._queue else None)
            oldest = round(now - first, 1) if first is not None else None
            failing, error = self._failing, self._last_error
        last_at, last_waiting, last_failing = self._published
        if not force and failing == last_failing and (
                now - last_at < STATE_EVERY or (waiting == last_waiting == 0)):
            return
        state = {"updated_at": dt.datetime.now(dt.UTC).isoformat(), "waiting": waiting,
                 "oldest_waiting_seconds": oldest, "failing": failing,
                 "last_error": error if failing else None}
        path = self.journal.directory / STATE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:  # informational only (the disk may be full)
            return
        self._published = (now, waiting, failing)

    # Life cycle ----------------------------------------------------------------------
    def recover(self) -> int:
        """Replay what the journal holds from before a stop or crash; checkpoint."""
        entries = self.journal.open()
        with self._cond:
            for entry in entries:
                self._pin(entry)
                self.replayed.add((str(entry.meta["study"]), str(entry.meta["series"])))
        for start in range(0, len(entries), BATCH):
            self._apply(entries[start:start + BATCH], recovering=True)
        self.checkpoint(force=True)
        self.publish(force=True)
        if entries:
            log.info("journal replayed", records=len(entries))
        return len(entries)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal-applier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Apply what is queued, checkpoint, stop (the listener is already stopped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # The thread ----------------------------------------------------------------------
    def _due(self, now: float) -> float:
        """0 when the queue should be applied now, else how long to wait (under _cond)."""
        if self._stopping or self._urgent > self._applied:
            return 0.0
        if self.journal.free_count() < LOW_SEGMENTS:
            return 0.0
        quiet_left = self._last_submit + APPLY_QUIET - now
        defer_left = self._queue[0][2] + MAX_DEFER - now
        return max(0.0, min(quiet_left, defer_left))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # never silently: associations would wait on a dead thread
            log.exception("journal applier stopped unexpectedly")
            raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(IDLE_CHECKPOINT)
                while self._queue and (delay := self._due(time.monotonic())) > 0:
                    self._cond.wait(delay)
                if not self._queue:
                    if self._stopping:
                        break
                    idle = True
                    batch: list[tuple[int, Entry, float]] = []
                else:
                    idle = False
                    count = min(BATCH, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(count)]
                    self._inflight = (count, batch[0][2])
            if idle:
                self._checkpoint_quietly(force=True)
                self.publish()
                continue
            while True:
                try:
                    self._apply([item[1] for item in batch], recovering=False)
                    break
                except Exception as exc:  # the records stay in the journal; try again
                    log.exception("journal apply failed; retrying", records=len(batch))
                    with self._cond:
                        self._failing = True  # nobody waits on us meanwhile
                        self._last_error = error_text(exc)
                        self._cond.notify_all()
                    self.publish()
                    with self._cond:
                        if self._stopping:  # replayed from the journal at the next start
                            return
                        self._cond.wait(RETRY_SECONDS)
            with self._cond:
                self._applied = batch[-1][0]
                self._inflight = (0, 0.0)
                self._failing = False
                self._cond.notify_all()
                more_due = bool(self._queue) and self._due(time.monotonic()) == 0
            self._run_due()
            # Records first, flushes later: a checkpoint (syncfs) only frees segments, so
            # it waits while more records are due, unless free segments run short.
            pressure = self.journal.free_count() < LOW_SEGMENTS
            if pressure or not more_due:
                self._checkpoint_quietly(force=pressure)
            self.publish()
        self._checkpoint_quietly(force=True)
        self.publish(force=True)
        self._run_due()

    def _checkpoint_quietly(self, *, force: bool) -> None:
        try:
            self.checkpoint(force=force)
        except Exception:
            log.exception("journal checkpoint failed")

    def checkpoint(self, *, force: bool) -> int:
        """Flush the spool and free every closed, fully applied segment; how many."""
        ready = [s for s in self.journal.active_segments() if self.journal.retirable(s)]
        enough = max(CHECKPOINT_SEGMENTS, self.journal.segments // 4)
        if not ready or (not force and len(ready) < enough):
            return 0
        self.spool.sync()
        for seg in ready:
            # Unpinned before the segment is free (a new record may take it at once);
            # pinned again if it could not be retired (or was already taken again).
            with self._cond:
                pins = self._pins.pop(seg, set())
            self.journal.retire(seg)
            if seg in self.journal.active_segments():
                with self._cond:
                    self._pins.setdefault(seg, set()).update(pins)
        return len(ready)

    def _apply(self, entries: Sequence[Entry], *, recovering: bool) -> None:
        with self.apply_lock:
            self._apply_locked(entries, recovering=recovering)

    def _apply_locked(self, entries: Sequence[Entry], *, recovering: bool) -> None:
        records: list[InstanceRecord] = []
        batch_versions: dict[str, list[tuple[int, str]]] = {}
        for entry in entries:
            header = header_from_meta(entry.meta)
            src, sha = self.spool.stage_copy(entry.segment.fd, entry.offset, entry.length)
            uid = header.sop_instance_uid
            known = self.ledger.versions_of(uid) if self.ledger is not None else []
            known += batch_versions.get(uid, [])
            try:
                stored = self.spool.store(src, header, known, sha256=sha,
                                          recovering=recovering)
            finally:
                src.unlink(missing_ok=True)
            batch_versions.setdefault(uid, []).append((stored.version, sha))
            meta = entry.meta
            received = dt.datetime.fromtimestamp(int(meta["t"]) / 1e9, dt.UTC)
            records.append(instance_record(header, stored, str(meta["ae"]),
                                           str(meta["assoc"]), str(meta["action"]),
                                           str(meta["rule"]), received))
        if self.ledger is not None:
            for rec, error in zip(records, self.ledger.record_instances(records), strict=True):
                if error is not None:
                    log.error("ledger record failed", sop_instance_uid=rec.sop_instance_uid,
                              version=rec.version, error=type(error).__name__)
        with self.journal.lock:
            for entry in entries:
                entry.segment.applied += 1


def _run_action(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # one failing action must not stop the applier
        log.exception("action after apply failed")
