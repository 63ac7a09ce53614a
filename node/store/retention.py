"""Retention: delete delivered data after its time, and the oldest first when the disk
fills (``[retention]``, :class:`node.config.RetentionSettings`).

What may be deleted
    A series in ``delivered`` — its current generation's job is done: every
    destination confirmed the SR (PS3.4 Annex J Storage Commitment or a C-FIND), or the
    rule has no destination and the SR is kept under ``<home>/reports`` — and, with
    ``ignored_days`` set, a series a ``store`` rule kept (``ignored``). Nothing
    receiving, queued, assessed, reported or failed is ever a candidate. A series that
    gets new images after delivery is re-opened by the ledger (back to ``receiving``,
    new generation) and stops being one; the purge re-checks state and generation in
    the same transaction that starts it.
Not under the applier
    The node's journal applier (:mod:`node.store.ingest`) holds ``apply_lock`` while it
    stores and records a batch; a series is purged under that lock, after checking
    that no record of it waits in the receive journal (acknowledged but not applied,
    or applied but not yet flushed: a crash would replay it). So no image of the series
    is stored meanwhile, and none comes back from a replay after it was deleted.
Crash-safe
    :meth:`~node.ledger.retention.RetentionAPI.begin_purge` marks the series
    ``purging`` before any file goes; a sweep first finishes purges a crash interrupted.
    Under the lock the series' directory is only renamed aside (:meth:`Spool.detach`)
    and its rows deleted: unlinking 200 files took ~0.5 s on this VM's busy disk, time
    the applier would otherwise wait; the files are unlinked after the lock is released.
The disk
    Above ``disk_high_percent`` used (default 90 %, as mercure's emergency clean-up),
    the oldest deletable series go first, whatever their age, until usage is at or
    below ``disk_low_percent``. The listener refuses images only at ``100 -
    [spool] min_free_percent`` (the configuration checks the order), and a refusal
    wakes the sweep at once (:attr:`node.store.spool.Spool.on_full`).

Every deletion is logged by UID with file count and bytes (``retention.deleted``),
never with a patient attribute.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from node.config import Settings
from node.ledger import Ledger, PurgeCandidate, SeriesState
from node.ledger.models import utcnow
from node.logs import get_logger
from node.pipeline.payload import job_key
from node.store.spool import Spool

log = get_logger(__name__)
DAY_SECONDS = 86_400.0
Reason = Literal["age", "disk", "resumed"]
#: The guard: held while one series is purged, yields the series UIDs not to touch.
Guard = Callable[[], AbstractContextManager[frozenset[str]]]
#: While a sweep could not bring the disk below the low mark, the next one triggered by
#: the disk (rather than the timer) waits this long.
STUCK_RETRY_SECONDS = 60.0
NODE_LOCK = "node.lock"
#: Candidates listed at a time by the disk clean-up.
DISK_PAGE = 50
#: ``<home>/reports`` (node.pipeline.reports.REPORTS_DIR; not imported: that module
#: brings the inference package into every process that only deletes).
REPORTS_DIR = "reports"
#: Roles of the companions' SOP Instance UIDs beside the SR (sr_writer.document / pdf):
#: ``derive_uid(job_key(...), role)``.
COMPANION_ROLES = ("text-sr-instance", "pdf-instance")


class NodeRunning(RuntimeError):
    """``qcnode serve`` runs on this home (it holds ``<home>/node.lock``)."""


def hold_node_lock(home: Path, *, exclusive: bool) -> int:
    """Lock ``<home>/node.lock``; the open descriptor (closing it releases the lock).

    ``qcnode serve`` holds it shared for its lifetime (waiting while a ``qcnode
    retention run`` holds it); the retention command takes it exclusively and raises
    :class:`NodeRunning` at once when a node holds it.
    """
    fd = os.open(home / NODE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if exclusive:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
    except BlockingIOError as exc:
        os.close(fd)
        raise NodeRunning("a node is running on this home") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


class DiskSpace(Protocol):
    """What :func:`shutil.disk_usage` returns, as far as retention reads it."""

    @property
    def total(self) -> int: ...
    @property
    def free(self) -> int: ...


DiskUsage = Callable[[str], DiskSpace]


class AppliesJournal(Protocol):
    """The part of :class:`node.store.ingest.Applier` retention waits for."""

    apply_lock: threading.Lock

    def pinned_series(self) -> frozenset[str]: ...


def applier_guard(applier: AppliesJournal) -> Guard:
    """A guard that holds the applier's lock and names the series it still holds."""

    @contextlib.contextmanager
    def hold() -> Iterator[frozenset[str]]:
        with applier.apply_lock:
            yield applier.pinned_series()

    return hold


@contextlib.contextmanager
def no_journal() -> Iterator[frozenset[str]]:
    """The guard when no node runs (the caller checked the journal holds nothing)."""
    yield frozenset()


@dataclass(frozen=True)
class Deleted:
    """A series whose files were deleted (or would be, in a dry run)."""

    series_instance_uid: str
    study_instance_uid: str
    state: str
    files: int
    size: int
    reason: Reason


@dataclass
class SweepReport:
    """What one sweep deleted (or would delete: ``dry_run``)."""

    dry_run: bool
    series: list[Deleted] = field(default_factory=list)
    quarantine_files: int = 0
    quarantine_bytes: int = 0
    report_files: int = 0
    report_bytes: int = 0
    held_back: list[str] = field(default_factory=list)  # pinned by the journal
    used_percent_before: float = 0.0
    used_percent_after: float = 0.0

    @property
    def size(self) -> int:
        return sum(d.size for d in self.series) + self.quarantine_bytes + self.report_bytes


class Retention:
    """One sweep at a time over the ledger and the spool (see the module documentation).

    ``guard`` is :func:`applier_guard` inside ``qcnode serve`` and :func:`no_journal`
    for the stopped node; ``disk_usage`` is :func:`shutil.disk_usage` (tests give a
    disk of a chosen size).
    """

    def __init__(self, settings: Settings, ledger: Ledger, spool: Spool, guard: Guard,
                 *, disk_usage: DiskUsage = shutil.disk_usage) -> None:
        self.settings = settings
        self.config = settings.retention
        self.ledger, self.spool, self.guard = ledger, spool, guard
        self.disk_usage = disk_usage
        self._lock = threading.Lock()
        #: The last sweep ended above the low mark with nothing more to delete.
        self.stuck = False
        self.disk_page = DISK_PAGE

    def used_percent(self) -> float:
        usage = self.disk_usage(str(self.spool.root))
        return 100.0 * (usage.total - usage.free) / usage.total if usage.total else 0.0

    def _space(self) -> tuple[int, int]:
        usage = self.disk_usage(str(self.spool.root))
        return usage.total or 1, usage.free

    def _high(self, total: int, free: int) -> bool:
        """Past the high mark: ``disk_high_percent`` used, or less than twice the
        spool's byte watermark free (on a small disk ``[spool] min_free_bytes`` may
        come before any percentage)."""
        used = 100.0 * (total - free) / total
        return used >= self.config.disk_high_percent or free < 2 * self.spool.min_free_bytes

    def _low(self, total: int, free: int) -> bool:
        """Down to the low mark (and twice the byte watermark free)."""
        used = 100.0 * (total - free) / total
        return used <= self.config.disk_low_percent and free >= 2 * self.spool.min_free_bytes

    def over_high(self) -> bool:
        """The disk is past the high mark (one ``statvfs``)."""
        return self._high(*self._space())

    def _states(self) -> tuple[SeriesState, ...]:
        if self.config.ignored_days is None:
            return (SeriesState.DELIVERED,)
        return (SeriesState.DELIVERED, SeriesState.IGNORED)

    def sweep(self, *, dry_run: bool = False) -> SweepReport:
        """Resume interrupted purges, delete by age, then by disk usage."""
        with self._lock:
            report = SweepReport(dry_run=dry_run, used_percent_before=self.used_percent())
            if not dry_run:
                self.spool.empty_trash()  # what a crash left detached
            for cand in self.ledger.purge_candidates((SeriesState.PURGING,)):
                self._purge(cand, "resumed", report)
            self._by_age(report)
            self._quarantine(report)
            self._reports(report)
            self._by_disk(report)
            report.used_percent_after = self.used_percent()
            if report.series or report.quarantine_files or report.report_files:
                log.info("retention.swept", dry_run=dry_run, series=len(report.series),
                         quarantine_files=report.quarantine_files,
                         report_files=report.report_files, bytes=report.size,
                         used_percent=round(report.used_percent_after, 1))
            return report

    def _by_age(self, report: SweepReport) -> None:
        now = utcnow()
        limits = ((SeriesState.DELIVERED, self.config.delivered_days),
                  (SeriesState.IGNORED, self.config.ignored_days))
        for state, days in limits:
            if days is None:
                continue
            before = now - _days(days)
            for cand in self.ledger.purge_candidates((state,), before=before):
                self._purge(cand, "age", report)

    def _by_disk(self, report: SweepReport) -> None:
        """Oldest deletable first while usage is above the low mark, once past the high."""
        total, free = self._space()
        if not self._high(total, free):
            self.stuck = False
            return
        seen = {d.series_instance_uid for d in report.series}  # a dry run lists once
        log.warning("retention.disk_high", used_percent=round(100 - 100 * free / total, 1),
                    free_bytes=free, high=self.config.disk_high_percent,
                    low=self.config.disk_low_percent)
        while not self._low(total, free):
            # Oldest first, a page at a time (purged series leave the listing; those
            # held back stay in it, hence the page grows with what was seen).
            limit = None if report.dry_run else len(seen) + self.disk_page
            page = [c for c in self.ledger.purge_candidates(self._states(), limit=limit)
                    if c.series_instance_uid not in seen]
            if not page:
                break
            for cand in page:
                if self._low(total, free):
                    break
                seen.add(cand.series_instance_uid)
                deleted = self._purge(cand, "disk", report)
                if deleted is not None:
                    total, free = (self._space() if not report.dry_run
                                   else (total, free + deleted.size))
        self.stuck = not self._low(total, free)
        if self.stuck:
            log.error("retention.disk_still_high", used_percent=round(100 - 100 * free / total, 1),
                      free_bytes=free, low=self.config.disk_low_percent,
                      detail="nothing more is deletable (undelivered data is kept)")

    def _purge(self, cand: PurgeCandidate, reason: Reason, report: SweepReport
               ) -> Deleted | None:
        uid = cand.series_instance_uid
        if report.dry_run:
            deleted = Deleted(uid, cand.study_instance_uid, cand.state.value, cand.files,
                              cand.size, reason)
            report.series.append(deleted)
            return deleted
        with self.guard() as pinned:
            if uid in pinned:
                report.held_back.append(uid)
                log.info("retention.held_back", series_uid=uid,
                         detail="records of this series are still in the receive journal")
                return None
            files = self.ledger.begin_purge(uid, cand.generation, cand.state)
            if files is None:  # re-opened or re-queued since it was listed
                return None
            for series_dir in sorted({relpath.rpartition("/")[0] for relpath, _ in files}):
                self.spool.detach(series_dir)
            count, size = len(files), sum(n for _, n in files)
            self.ledger.finish_purge(uid, f"{reason}: {count} files, {size} bytes deleted")
        self.spool.empty_trash()
        deleted = Deleted(uid, cand.study_instance_uid, cand.state.value, count, size, reason)
        report.series.append(deleted)
        log.info("retention.deleted", series_uid=uid, study_uid=cand.study_instance_uid,
                 state=cand.state.value, files=count, bytes=size, reason=reason)
        return deleted

    def _quarantine(self, report: SweepReport) -> None:
        days = self.config.quarantine_days
        if days is None:
            return
        for path, size in self.spool.expired_quarantine(time.time() - days * DAY_SECONDS):
            if not report.dry_run:
                path.unlink(missing_ok=True)
                log.info("retention.quarantine_deleted", file=path.name, bytes=size)
            report.quarantine_files += 1
            report.quarantine_bytes += size


    def _reports(self, report: SweepReport) -> None:
        """Report files (SR, Text SR, PDF) of jobs finished ``reports_days`` ago."""
        days = self.config.reports_days
        if days is None:
            return
        from sr_writer.uids import derive_uid  # the package brings highdicom: only now

        root = self.settings.node.home / REPORTS_DIR
        for kept in self.ledger.expired_reports(utcnow() - _days(days)):
            sr = root / kept.report_path
            key = job_key(kept.series_instance_uid, kept.generation, kept.engine_key)
            paths = [sr, *(sr.with_name(f"{derive_uid(key, role)}.dcm")
                           for role in COMPANION_ROLES)]
            found = [(p, p.stat().st_size) for p in paths if p.is_file()]
            report.report_files += len(found)
            report.report_bytes += sum(size for _, size in found)
            if report.dry_run:
                continue
            for path, _ in found:
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # other reports of the study: kept
                sr.parent.rmdir()
            self.ledger.forget_report(kept.job_id)
            log.info("retention.report_deleted", job_id=kept.job_id,
                     series_uid=kept.series_instance_uid, files=len(found),
                     bytes=sum(size for _, size in found))


def _days(days: float) -> dt.timedelta:
    return dt.timedelta(days=days)


class Sweeper:
    """The sweep thread of ``qcnode serve``: every ``sweep_seconds``, and as soon as the
    disk passes the high mark (checked every ``disk_check_seconds``) or the listener
    refused an image (:meth:`wake`). A context manager."""

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qcnode-retention",
                                        daemon=True)

    def wake(self) -> None:
        """Sweep now (called from the listener when it refuses for lack of space)."""
        self._wake.set()

    def __enter__(self) -> Sweeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    def _due(self, now: float, last: float, next_sweep: float) -> bool:
        if now >= next_sweep:
            return True
        if self.retention.stuck and now < last + STUCK_RETRY_SECONDS:
            return False
        return self._wake.is_set() or self.retention.over_high()

    def _run(self) -> None:
        config = self.retention.config
        last, next_sweep = 0.0, 0.0
        while not self._stop.is_set():
            try:
                if self._due(time.monotonic(), last, next_sweep):
                    self._wake.clear()
                    last = time.monotonic()
                    next_sweep = last + config.sweep_seconds
                    self.retention.sweep()
            except Exception:  # a failed sweep is retried at the next one
                log.exception("retention.sweep_failed")
            self._wake.wait(min(config.disk_check_seconds,
                                max(0.0, next_sweep - time.monotonic())))
