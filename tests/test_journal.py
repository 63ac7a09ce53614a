"""The receive journal (node.store.journal) and its applier (node.store.ingest).

What is guaranteed, and checked here against real files:

* a committed record survives a crash: reopening the directory returns it, bytes and
  meta identical;
* a record that was not committed (refused, aborted, or cut by a crash before its
  flush) is never replayed, nor is anything left by an earlier use of a reused segment,
  nor a record header a sender planted inside its own data set;
* a torn record ends recovery at that point, records before it are kept;
* replaying is idempotent: applying the same records again leaves one file and one
  ledger row per instance, and a spool file a crash left renamed but unflushed
  (garbage bytes) is replaced by the journal's bytes.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pydicom
import pytest

from node.ledger import Ledger
from node.receive.dicomio import read_header
from node.store import journal as journal_module
from node.store.ingest import Applier, entry_meta
from node.store.journal import RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, Journal, Record
from node.store.spool import Spool
from tests.support.dcmtk import write_ct_series

SEGMENT = 1 << 20


def _journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, segments=2)
    assert journal.open() == []
    return journal


def _append(journal: Journal, writer_data: list[bytes]) -> list[dict[str, int]]:
    writer = journal.writer()
    metas = []
    for i, data in enumerate(writer_data):
        record = writer.begin()
        for start in range(0, len(data), 7000):  # fragments, as P-DATA delivers them
            record.write(memoryview(data[start:start + 7000]))
        meta = {"i": i, "t": i}
        writer.commit(record, meta)
        metas.append(meta)
    return metas


def _crash(journal: Journal) -> Journal:
    """Drop the journal without retiring anything, as SIGKILL would; reopen it."""
    journal.close()
    return Journal(journal.directory, segment_bytes=SEGMENT, segments=2)


def test_committed_records_survive_and_uncommitted_do_not(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    payloads = [os.urandom(600_000), os.urandom(5), os.urandom(600_000), os.urandom(300_000)]
    metas = _append(journal, payloads)
    writer = journal.writer()
    abandoned = writer.begin()  # a data set that was refused / aborted: never committed
    abandoned.write(memoryview(os.urandom(50_000)))
    reopened = _crash(journal)
    entries = reopened.open()
    assert [e.meta for e in entries] == metas
    for entry, payload in zip(entries, payloads, strict=True):
        with entry.view() as data:
            assert bytes(data) == payload
    assert len({e.segment.path for e in entries}) >= 2  # 1 MiB segments: rotation happened
    reopened.close()


def test_record_views_follow_a_segment_that_grows_and_is_reused(tmp_path: Path) -> None:
    """A record that runs past the segment's size (the file grows) is read whole by
    the listener's header scan and replayed whole; after the segment was retired and
    taken again, its views and its replay show the new record only."""
    journal = _journal(tmp_path)
    writer = journal.writer()
    small, large = os.urandom(1000), os.urandom(SEGMENT + 300_000)
    views = []
    for data in (small, large):
        record = writer.begin()
        record.write(memoryview(data))
        with record.view() as seen:  # what the listener's header scan reads
            views.append(bytes(seen))
        writer.commit(record, {"n": len(data)})
    assert views == [small, large]
    seg = writer.segment
    assert seg is not None and os.fstat(seg.fd).st_size > SEGMENT
    writer.close()
    seg.applied = seg.written
    journal.retire(seg)
    again = journal.writer()
    fresh = os.urandom(2000)
    record = again.begin()
    assert record.segment is seg  # reused
    record.write(memoryview(fresh))
    with record.view() as seen:
        assert bytes(seen) == fresh
    again.commit(record, {"n": len(fresh)})
    again.close()
    reopened = _crash(journal)
    entries = reopened.open()
    assert [e.meta for e in entries] == [{"n": len(fresh)}]
    with entries[0].view() as seen:
        assert bytes(seen) == fresh
    reopened.close()


def test_record_checksum_is_zlibs_crc32() -> None:
    """ISA-L computes the records' CRC-32: the same values as zlib's, so journals
    written by either recover under the other (also when fed in fragments)."""
    data = os.urandom(300_001)
    assert journal_module.crc32(data, 0) == zlib.crc32(data)
    running = 0
    for start in range(0, len(data), 7000):
        running = journal_module.crc32(memoryview(data)[start:start + 7000], running)
    assert running == zlib.crc32(data)


def test_torn_record_ends_recovery_and_reuse_forgets_old_records(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    _append(journal, [b"a" * 1000, b"b" * 1000, b"c" * 1000])
    path = next(iter(journal.active_segments())).path
    journal.close()
    with path.open("r+b") as fh:  # flip one byte of the second record's data
        second = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 1000 + 13 + RECORD_HEADER_BYTES
        fh.seek(second + 10)
        fh.write(b"X")
    reopened = Journal(journal.directory, segment_bytes=SEGMENT, segments=2)
    entries = reopened.open()
    assert [e.meta["i"] for e in entries] == [0]
    # The segment is retired once applied and reused under a new salt: its old records
    # (still on disk) must not come back after another crash.
    for entry in entries:
        entry.segment.applied += 1
    seg = entries[0].segment
    assert reopened.retirable(seg)
    reopened.retire(seg)
    writer = reopened.writer()
    while writer.segment is not seg:  # take segments until the old one is reused
        writer.close()
        writer.begin()
    again = _crash(reopened).open()
    assert again == []


def test_planted_record_header_in_data_is_not_replayed(tmp_path: Path) -> None:
    """A sender cannot make recovery invent a record: the salt is random per use."""
    journal = _journal(tmp_path)
    writer = journal.writer()
    record = writer.begin()
    fake = b"QCJR" + os.urandom(RECORD_HEADER_BYTES - 4)
    record.write(memoryview(b"x" * 100 + fake * 50))
    # never committed; a shorter record is committed over its start
    record.discard()
    short = writer.begin()
    short.write(memoryview(b"y" * 10))
    writer.commit(short, {"t": 1})
    entries = _crash(journal).open()
    assert [e.length for e in entries] == [10]


@pytest.fixture()
def spool_ledger(tmp_path: Path) -> tuple[Spool, Ledger]:
    spool = Spool(tmp_path / "spool", tmp_path)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    return spool, ledger


def _commit_files(journal: Journal, files: list[Path]) -> None:
    writer = journal.writer()
    for path in files:
        record: Record = writer.begin()
        record.write(memoryview(path.read_bytes()))
        header = read_header(path)
        writer.commit(record, entry_meta(header, "MODALITY", "a1", "assess", "ct"))
    writer.close()


def test_replay_is_idempotent_and_repairs_unflushed_files(
    tmp_path: Path, spool_ledger: tuple[Spool, Ledger]
) -> None:
    spool, ledger = spool_ledger
    files = write_ct_series(tmp_path / "ct", 3, size=64)
    journal = _journal(tmp_path)
    _commit_files(journal, files)
    journal.close()
    # First start after the "crash": everything applied, segments retired.
    first = Applier(Journal(journal.directory, segment_bytes=SEGMENT, segments=2), spool,
                    ledger)
    assert first.recover() == 3
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert len(ledger.instance_relpaths(series_uid)) == 3
    first.journal.close()
    # Same records again (a crash before the checkpoint), one spool file garbled as an
    # unflushed rename leaves it: replaced, still one file and one row per instance.
    shutil.rmtree(journal.directory)
    again = _journal(tmp_path)
    _commit_files(again, files)
    again.close()
    victim = next(spool.root.rglob("*.dcm"))
    victim.write_bytes(b"\0" * 100)
    second = Applier(Journal(journal.directory, segment_bytes=SEGMENT, segments=2), spool,
                     ledger)
    assert second.recover() == 3
    second.journal.close()
    stored = sorted(spool.root.rglob("*.dcm"))
    assert len(stored) == 3 and len(ledger.instance_relpaths(series_uid)) == 3
    originals = sorted(f.read_bytes() for f in files)
    assert sorted(p.read_bytes() for p in stored) == originals
    ledger.close()


def test_spool_unwritable_then_stop_then_restart_loses_nothing(tmp_path: Path) -> None:
    """Guaranteed: images acknowledged while the spool cannot take them (here a file
    where their study directory must go; a full disk behaves alike) stay in the
    journal, the node keeps answering and stops promptly, and the next start applies
    them: every acknowledged image in the spool (same data set) and the ledger."""
    from node.config import Settings
    from node.receive.scp import Listener
    from node.status import journal_state, render_text
    from tests.support.dcmtk import storescu, successes
    from tests.support.net import wait_for

    settings = Settings.model_validate({
        "node": {"ae_title": "QCNODE", "host": "127.0.0.1", "port": 0,
                 "home": str(tmp_path / "home")},
        "senders": [{"ae_title": "*", "host": "127.0.0.1"}],
        "spool": {"min_free_bytes": 0, "min_free_percent": 0.0,
                  "journal_segment_bytes": SEGMENT, "journal_segments": 2},
    })
    files = write_ct_series(tmp_path / "ct", 3, size=64)
    first = pydicom.dcmread(files[0])
    series_uid, study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    ledger = Ledger.open(settings.ledger_url)
    spool = Spool(settings.spool_dir, settings.node.home)
    blocker = spool.root / study_uid
    blocker.write_bytes(b"not a directory")
    listener = Listener(settings, spool, ledger)
    listener.start()
    try:
        run = storescu(listener.address[1], files)
        assert sorted(successes(run.stdout + run.stderr)) == sorted(files), run.stdout
        wait_for(lambda: listener.applier.failing, timeout=30, what="applier retrying")
        assert ledger.instance_relpaths(series_uid) == []
        state = wait_for(lambda: (s := journal_state(settings.node.home)) and s["failing"]
                         and s, timeout=30, what="qcnode status sees the backlog")
        assert state["waiting"] == 3 and "NotADirectoryError" in state["last_error"]
        assert "3 image(s) acknowledged" in render_text(
            {"counts": {}, "oldest_waiting": None, "series": [], "failures": [],
             "journal": state})
    finally:
        listener.stop(10.0)  # prompt: nobody waits on a failing applier
    blocker.unlink()
    again = Listener(settings, Spool(settings.spool_dir, settings.node.home), ledger)
    assert again.recover() == 3
    again.stop(5.0)
    assert journal_state(settings.node.home) == {**(journal_state(settings.node.home) or {}),
                                                  "waiting": 0, "failing": False}
    stored = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread,
                                                         spool.root.rglob("*.dcm"))}
    assert len(ledger.instance_relpaths(series_uid)) == 3
    assert len(stored) == 3
    for original in map(pydicom.dcmread, files):  # the data sets as sent, unchanged
        assert stored[str(original.SOPInstanceUID)].PixelData == original.PixelData
    ledger.close()


def test_action_after_apply_runs_only_once_the_record_is_applied(
    tmp_path: Path, spool_ledger: tuple[Spool, Ledger]
) -> None:
    """An association's end is recorded only after its images were applied (the
    completion monitor must never see a released association with images on the way)."""
    from tests.support.net import wait_for

    spool, ledger = spool_ledger
    journal = _journal(tmp_path)
    applier = Applier(journal, spool, ledger)
    ran: list[str] = []
    applier.after(0, lambda: ran.append("nothing stored"))
    assert ran == ["nothing stored"]  # no record to wait for: at once, in this thread
    path = write_ct_series(tmp_path / "ct", 1, size=16)[0]
    writer = journal.writer()
    record = writer.begin()
    record.write(memoryview(path.read_bytes()))
    header = read_header(path)
    ticket = applier.submit(writer.commit(record, entry_meta(header, "M", "a1", "assess", "ct")))
    series = header.series_instance_uid
    applier.after(ticket, lambda: ran.append(f"{len(ledger.instance_relpaths(series))} applied"))
    assert ran == ["nothing stored"]
    applier.start()
    try:
        wait_for(lambda: len(ran) == 2, timeout=30, what="the action after apply")
    finally:
        applier.stop()
    assert ran == ["nothing stored", "1 applied"]
    journal.close()


def test_hurry_applies_without_waiting_for_senders_to_pause(
    tmp_path: Path, spool_ledger: tuple[Spool, Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The applier waits for a pause in the senders' traffic, except when the last open
    association ends (``hurry``): its series must not wait to complete."""
    from node.store import ingest
    from tests.support.net import wait_for

    monkeypatch.setattr(ingest, "APPLY_QUIET", 60.0)  # senders never pause here
    monkeypatch.setattr(ingest, "MAX_DEFER", 60.0)
    spool, ledger = spool_ledger
    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, segments=6)
    assert journal.open() == []  # enough free segments: no pressure to apply
    applier = Applier(journal, spool, ledger)
    files = write_ct_series(tmp_path / "ct", 2, size=16)
    writer = journal.writer()
    tickets = []
    for path in files:
        record = writer.begin()
        record.write(memoryview(path.read_bytes()))
        meta = entry_meta(read_header(path), "M", "a1", "assess", "ct")
        tickets.append(applier.submit(writer.commit(record, meta)))
    ran: list[int] = []
    applier.start()
    try:
        applier.after(tickets[0], lambda: ran.append(1))
        with pytest.raises(TimeoutError):  # not hurried: waits for the pause
            wait_for(lambda: ran, timeout=1.0, what="an unhurried apply")
        applier.after(tickets[1], lambda: ran.append(2), hurry=True)
        wait_for(lambda: ran == [1, 2], timeout=30, what="the hurried apply")
    finally:
        applier.stop()
    journal.close()
