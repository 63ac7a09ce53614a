"""Retention (node.store.retention): what is deleted, what never is, and the disk watermark.

Real spool files and a real ledger (SQLite and PostgreSQL); only the disk's size is
chosen by the test (``disk_usage``), so the watermark can be crossed without filling the
machine's disk.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from sqlalchemy import update

from node.config import NodeSettings, RetentionSettings, Settings
from node.ledger import JobState, Ledger, SeriesState
from node.ledger.models import Job, Series, utcnow
from node.pipeline.payload import job_key
from node.store.ingest import Applier, entry_meta
from node.store.journal import Journal
from node.store.retention import Guard, Retention, applier_guard, no_journal
from node.store.spool import Spool
from sr_writer.uids import derive_uid
from tests.support.spooled import encode, header, spool_series, template

STUDY = "1.2.826.0.1.3680043.8.498.90.1"
S = SeriesState


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.90.2.{n}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def ledger(home: Path, ledger_url: str) -> Iterator[Ledger]:
    """SQLite and PostgreSQL (``ledger_url``)."""
    home.mkdir(parents=True)
    with Ledger.open(ledger_url) as opened:
        yield opened


@pytest.fixture
def spool(home: Path, ledger: Ledger) -> Spool:
    return Spool(home / "spool", home)


def settings(home: Path, **retention: Any) -> Settings:
    return Settings(node=NodeSettings(home=home), retention=RetentionSettings(**retention))


def age(ledger: Ledger, series: str, days: float) -> None:
    """Make ``series`` have entered its state ``days`` ago."""
    with ledger.engine.begin() as conn:
        conn.execute(update(Series).where(Series.series_uid == series)
                     .values(state_changed_at=utcnow() - dt.timedelta(days=days)))


def files_of(spool: Spool, series: str) -> list[Path]:
    directory = spool.root / STUDY / series
    return sorted(directory.iterdir()) if directory.is_dir() else []


class Usage(NamedTuple):
    total: int
    used: int
    free: int


class Disk:
    """A disk of ``total`` bytes holding ``other`` bytes besides the spool's files."""

    def __init__(self, spool: Spool, total: int, other: int) -> None:
        self.spool, self.total, self.other = spool, total, other

    def __call__(self, path: str) -> Usage:
        used = self.other + sum(p.stat().st_size for p in self.spool.root.rglob("*.dcm"))
        return Usage(self.total, used, self.total - used)


def roomy(path: str) -> Usage:
    """A disk far below every watermark whatever the machine's own disk holds: the age
    rules are tested apart from the disk rules (``Disk``)."""
    return Usage(10**15, 10**9, 10**15 - 10**9)


def on_a_roomy_disk(config: Settings, ledger: Ledger, spool: Spool, guard: Guard) -> Retention:
    return Retention(config, ledger, spool, guard, disk_usage=roomy)


def test_age_deletes_only_delivered_series_past_their_days(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    states = {uid(1): S.DELIVERED, uid(2): S.DELIVERED, uid(3): S.FAILED,
              uid(4): None, uid(5): S.QUEUED, uid(6): S.IGNORED, uid(7): S.COMPLETE}
    for series, state in states.items():
        spool_series(ledger, spool, STUDY, series, 3, state=state)
        age(ledger, series, 30)
    age(ledger, uid(2), 2)  # delivered, but recently
    retention = on_a_roomy_disk(settings(home, delivered_days=7), ledger, spool, no_journal)

    report = retention.sweep()

    assert [d.series_instance_uid for d in report.series] == [uid(1)]
    assert report.series[0].files == 3 and report.series[0].size > 0
    assert files_of(spool, uid(1)) == [] and not (spool.root / STUDY / uid(1)).exists()
    assert ledger.series_relpaths([uid(1)]) == set()
    assert ledger.series_info(uid(1)).state == S.PURGED
    assert ledger.series_info(uid(1)).instance_count == 0
    assert [e.kind for e in ledger.series_history(uid(1))][-2:] == ["retention"] * 2
    for series in states.keys() - {uid(1)}:
        assert len(files_of(spool, series)) == 3, series
        assert len(ledger.series_relpaths([series])) == 3, series
    assert ledger.series_info(uid(3)).state == S.FAILED


def test_ignored_series_only_with_ignored_days(home: Path, ledger: Ledger, spool: Spool) -> None:
    spool_series(ledger, spool, STUDY, uid(1), 2, state=S.IGNORED)
    age(ledger, uid(1), 30)
    assert not on_a_roomy_disk(settings(home, delivered_days=1), ledger, spool,
                         no_journal).sweep().series
    report = on_a_roomy_disk(settings(home, ignored_days=7), ledger, spool, no_journal).sweep()
    assert [d.series_instance_uid for d in report.series] == [uid(1)]
    assert files_of(spool, uid(1)) == []


def test_dry_run_deletes_nothing(home: Path, ledger: Ledger, spool: Spool) -> None:
    spool_series(ledger, spool, STUDY, uid(1), 2)
    age(ledger, uid(1), 30)
    report = on_a_roomy_disk(settings(home, delivered_days=7), ledger, spool,
                       no_journal).sweep(dry_run=True)
    assert [d.series_instance_uid for d in report.series] == [uid(1)]
    assert len(files_of(spool, uid(1))) == 2
    assert ledger.series_info(uid(1)).state == S.DELIVERED


def test_reopened_series_is_not_deleted(home: Path, ledger: Ledger, spool: Spool) -> None:
    """New images after delivery re-open the series: it is no longer deletable, even
    when it was listed as a candidate before they arrived."""
    spool_series(ledger, spool, STUDY, uid(1), 2)
    age(ledger, uid(1), 30)
    listed = ledger.purge_candidates((S.DELIVERED,))
    assert [c.series_instance_uid for c in listed] == [uid(1)]
    late = spool_series(ledger, spool, STUDY, uid(1), 3, state=None)  # .0, .1 dupes; .2 new
    assert ledger.series_info(uid(1)).state == S.RECEIVING

    assert ledger.begin_purge(uid(1), listed[0].generation, S.DELIVERED) is None
    config = settings(home, delivered_days=0)
    report = on_a_roomy_disk(config, ledger, spool, no_journal).sweep()

    assert report.series == []
    assert len(files_of(spool, uid(1))) == 3
    assert all((spool.root / p).is_file() for p in late)


def test_interrupted_purge_is_finished_by_the_next_sweep(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    spool_series(ledger, spool, STUDY, uid(1), 3)
    spool_series(ledger, spool, STUDY, uid(2), 3)
    for series in (uid(1), uid(2)):  # a crash after the first step of both purges,
        assert ledger.begin_purge(series, 1, S.DELIVERED) is not None
    spool.detach(f"{STUDY}/{uid(2)}")  # and after the second one's files were moved aside
    report = on_a_roomy_disk(settings(home), ledger, spool, no_journal).sweep()
    assert sorted((d.series_instance_uid, d.reason) for d in report.series) == [
        (uid(1), "resumed"), (uid(2), "resumed")]
    assert files_of(spool, uid(1)) == files_of(spool, uid(2)) == []
    assert not list(spool.trash.iterdir())
    assert ledger.series_info(uid(1)).state == ledger.series_info(uid(2)).state == S.PURGED


def test_series_with_records_in_the_journal_is_held_back(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    """A record acknowledged but not yet applied (or applied but not yet flushed) keeps
    its series: a crash would replay it into a series deleted under it."""
    spool_series(ledger, spool, STUDY, uid(1), 2)
    age(ledger, uid(1), 30)
    journal = Journal(home / "journal", segment_bytes=1 << 20, segments=2)
    applier = Applier(journal, spool, ledger)
    applier.recover()
    writer = journal.writer()
    record = writer.begin()
    sop = f"{uid(1)}.0"  # the same bytes again: a duplicate, the series stays delivered
    data = encode(template(), STUDY, uid(1), sop)
    record.write(memoryview(data))
    entry = writer.commit(record, entry_meta(header(STUDY, uid(1), sop), "SENDER", "a1",
                                             "assess", "ct"))
    applier.submit(entry)
    retention = on_a_roomy_disk(settings(home, delivered_days=7), ledger, spool,
                          applier_guard(applier))
    try:
        report = retention.sweep()
        assert report.series == [] and report.held_back == [uid(1)]
        assert len(files_of(spool, uid(1))) == 2

        writer.close()
        applier.start()
        applier.stop()  # applies the record, flushes, retires the segment
        assert ledger.series_info(uid(1)).state == S.DELIVERED
        report = retention.sweep()
        assert [d.series_instance_uid for d in report.series] == [uid(1)]
        assert files_of(spool, uid(1)) == []
    finally:
        journal.close()


def test_disk_watermark_deletes_oldest_delivered_first_down_to_low(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    for n in range(1, 6):
        spool_series(ledger, spool, STUDY, uid(n), 10)
        age(ledger, uid(n), 10 - n)  # uid(1) delivered first
    spool_series(ledger, spool, STUDY, uid(9), 10, state=S.FAILED)
    age(ledger, uid(9), 20)  # the oldest of all, but never delivered
    series_bytes = sum(p.stat().st_size for p in files_of(spool, uid(1)))
    # 6 series of equal size; each is 5 % of this disk; used 96 %.
    total = 20 * series_bytes
    disk = Disk(spool, total, other=int(total * 0.96) - 6 * series_bytes)
    config = settings(home, disk_high_percent=90, disk_low_percent=82)
    retention = Retention(config, ledger, spool, no_journal, disk_usage=disk)
    retention.disk_page = 2  # listed two at a time

    report = retention.sweep()

    # 96 → 91 → 86 → 81 %: three series, the oldest delivered ones; the low mark stops it.
    assert [d.series_instance_uid for d in report.series] == [uid(1), uid(2), uid(3)]
    assert {d.reason for d in report.series} == {"disk"}
    assert report.used_percent_after <= 82 < report.used_percent_before - 10
    for n in (4, 5, 9):
        assert len(files_of(spool, uid(n))) == 10
    assert ledger.series_info(uid(9)).state == S.FAILED
    # Below the high mark: nothing more.
    assert Retention(config, ledger, spool, no_journal, disk_usage=disk).sweep().series == []


def test_disk_watermark_never_deletes_undelivered(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    spool_series(ledger, spool, STUDY, uid(1), 4, state=S.FAILED)
    spool_series(ledger, spool, STUDY, uid(2), 4, state=S.REPORTING)
    spool_series(ledger, spool, STUDY, uid(3), 4, state=None)
    spooled = sum(p.stat().st_size for p in spool.root.rglob("*.dcm"))
    disk = Disk(spool, 2 * spooled, other=int(2 * spooled * 0.95) - spooled)  # 95 % used
    retention = Retention(settings(home), ledger, spool, no_journal, disk_usage=disk)
    report = retention.sweep()
    assert report.series == [] and retention.stuck
    assert sum(len(files_of(spool, uid(n))) for n in (1, 2, 3)) == 12


def test_quarantine_days(home: Path, ledger: Ledger, spool: Spool) -> None:
    old = spool.quarantine_dir / "20260101T000000-aaaa.dcm"
    old.write_bytes(b"x" * 10)
    old.with_suffix(".reason").write_text("bad\n")
    new = spool.quarantine_dir / "20261201T000000-bbbb.dcm"
    new.write_bytes(b"y" * 10)
    stamp = time.time() - 40 * 86_400
    for path in (old, old.with_suffix(".reason")):
        os.utime(path, (stamp, stamp))
    config = settings(home, quarantine_days=30)
    report = on_a_roomy_disk(config, ledger, spool, no_journal).sweep()
    assert report.quarantine_files == 2
    assert sorted(p.name for p in spool.quarantine_dir.iterdir()) == [new.name]


def test_series_sent_again_after_purge_reopens_as_a_new_generation(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    """The purged series' row keeps its generation, so the SR of the new one gets new
    UIDs (derived from series, generation, engine) and supersedes the first."""
    spool_series(ledger, spool, STUDY, uid(1), 2)
    age(ledger, uid(1), 30)
    on_a_roomy_disk(settings(home, delivered_days=7), ledger, spool, no_journal).sweep()
    assert ledger.series_info(uid(1)).state == S.PURGED

    again = spool_series(ledger, spool, STUDY, uid(1), 2, state=None)

    info = ledger.series_info(uid(1))
    assert (info.state, info.generation, info.instance_count) == (S.RECEIVING, 2, 2)
    assert ledger.series_relpaths([uid(1)]) == set(again)
    assert all((spool.root / p).is_file() for p in again)


def finished_job(ledger: Ledger, home: Path, series: str, *, state: JobState,
                 days_ago: float) -> tuple[int, list[Path]]:
    """A job that went to ``state`` ``days_ago``, with its SR and Text SR kept."""
    job = ledger.create_job(series, 1, "physics|1.0.0|-|-")
    for step in (JobState.ASSESSING, JobState.REPORTING):
        ledger.move_job(job.id, step)
    key = job_key(series, 1, job.engine_key)
    names = [derive_uid(key, "sr-instance"), derive_uid(key, "text-sr-instance")]
    files = [home / "reports" / STUDY / f"{name}.dcm" for name in names]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"r" * 100)
    ledger.move_job(job.id, JobState.DELIVERING, report_path=f"{STUDY}/{names[0]}.dcm")
    if state != JobState.DELIVERING:
        ledger.move_job(job.id, state)
    with ledger.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job.id).values(
            finished_at=utcnow() - dt.timedelta(days=days_ago)))
    return job.id, files


def test_reports_days_deletes_reports_of_jobs_done_long_ago(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    for n in (1, 2, 3):
        spool_series(ledger, spool, STUDY, uid(n), 1, state=S.REPORTING)
    old, old_files = finished_job(ledger, home, uid(1), state=JobState.DONE, days_ago=30)
    recent, recent_files = finished_job(ledger, home, uid(2), state=JobState.DONE,
                                        days_ago=1)
    sending, sending_files = finished_job(ledger, home, uid(3),
                                          state=JobState.DELIVERING, days_ago=30)

    report = on_a_roomy_disk(settings(home, reports_days=7), ledger, spool, no_journal).sweep()

    assert (report.report_files, report.report_bytes) == (2, 200)
    assert not any(p.exists() for p in old_files)
    assert ledger.get_job(old).report_path is None
    assert all(p.is_file() for p in recent_files + sending_files)
    assert ledger.get_job(recent).report_path is not None
    assert ledger.get_job(sending).report_path is not None


def test_byte_watermark_counts_as_high_on_a_small_disk(
        home: Path, ledger: Ledger, spool: Spool) -> None:
    """Half the disk free, but less than twice ``min_free_bytes``: the listener would
    refuse soon, so the oldest delivered series go until twice that is free."""
    for n in (1, 2, 3):
        spool_series(ledger, spool, STUDY, uid(n), 4)
        age(ledger, uid(n), 10 - n)
    size = sum(p.stat().st_size for p in files_of(spool, uid(1)))
    disk = Disk(spool, 100 * size, other=47 * size)  # 50 % used, 50 series sizes free
    spool.min_free_bytes = 26 * size  # refuses below 26; the sweep wants 52 free
    retention = Retention(settings(home), ledger, spool, no_journal, disk_usage=disk)
    report = retention.sweep()
    assert [d.series_instance_uid for d in report.series] == [uid(1), uid(2)]
    assert len(files_of(spool, uid(3))) == 4 and not retention.stuck
