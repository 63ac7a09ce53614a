"""Retention and start-up inside the node: the sweep of ``qcnode serve``, the
``qcnode retention`` command, and a start-up that reads only open or replayed series."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import update

from node.config import ConfigError, NodeSettings, Settings, SpoolSettings, load_settings
from node.ledger import Ledger, SeriesState
from node.ledger.models import Series, utcnow
from node.serve import Node
from node.store.ingest import entry_meta
from node.store.journal import Journal
from node.store.spool import Spool, SpoolFull
from tests.support.dcmtk import echoscu
from tests.support.net import free_port, wait_for
from tests.support.node import REPO, running_node, write_config
from tests.support.spooled import encode, header, spool_series, template

STUDY = "1.2.826.0.1.3680043.8.498.91.1"
S = SeriesState


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.91.2.{n}"


def ledger_at(home: Path) -> Ledger:
    home.mkdir(parents=True, exist_ok=True)
    return Ledger.open(f"sqlite:///{(home / 'ledger.sqlite3').resolve()}")


def age(ledger: Ledger, series: str, days: float) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(update(Series).where(Series.series_uid == series)
                     .values(state_changed_at=utcnow() - dt.timedelta(days=days)))


def test_startup_reads_only_open_series(tmp_path: Path) -> None:
    """A file the ledger does not know is recorded at start-up only in the directory of
    a series still receiving (or replayed from the journal): a delivered series'
    directory is not read, so start-up does not grow with the spool."""
    home = tmp_path / "home"
    with ledger_at(home) as ledger:
        spool = Spool(home / "spool", home)
        spool_series(ledger, spool, STUDY, uid(1), 2)  # delivered
        spool_series(ledger, spool, STUDY, uid(2), 2, state=None)  # receiving
    for series in (uid(1), uid(2)):
        stray = spool.root / STUDY / series / f"{series}.99.dcm"
        stray.write_bytes(encode(template(), STUDY, series, f"{series}.99"))
    settings = Settings(
        node=NodeSettings(home=home, port=0),
        spool=SpoolSettings(min_free_bytes=0, min_free_percent=0.0,
                            journal_segment_bytes=1 << 20, journal_segments=2))
    with Node(settings) as node:
        assert node.ledger is not None
        known = node.ledger.series_relpaths([uid(1), uid(2)])
    assert f"{STUDY}/{uid(2)}/{uid(2)}.99.dcm" in known
    assert f"{STUDY}/{uid(1)}/{uid(1)}.99.dcm" not in known
    assert not list(spool.quarantine_dir.iterdir())


def test_check_room_wakes_the_sweep_before_refusing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path, min_free_bytes=2**62)
    woken: list[bool] = []
    spool.on_full = lambda: woken.append(True)
    with pytest.raises(SpoolFull):
        spool.check_room(100)
    assert woken == [True]


def test_high_mark_must_be_below_the_refusal_point(tmp_path: Path) -> None:
    config = write_config(tmp_path / "q.toml", {"spool": {"min_free_percent": 15.0}})
    with pytest.raises(ConfigError, match="disk_high_percent"):
        load_settings(config)
    config = write_config(tmp_path / "q.toml", {"retention": {"disk_high_percent": 80.0,
                                                              "disk_low_percent": 85.0}})
    with pytest.raises(ConfigError, match="disk_low_percent"):
        load_settings(config)


def retention_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "retention", "--config", str(config), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_serve_sweeps_and_the_command_waits_for_it_to_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with ledger_at(home) as ledger:
        spool = Spool(home / "spool", home)
        for n, state in ((1, S.DELIVERED), (2, S.FAILED), (3, S.DELIVERED)):
            spool_series(ledger, spool, STUDY, uid(n), 2, state=state)
            age(ledger, uid(n), 30)
        age(ledger, uid(3), 1)
    # Age rules only: the watermark set where this machine's own disk cannot cross it
    # (the disk rules are tested on a disk of the test's choosing, test_retention.py).
    extra = {"retention": {"delivered_days": 7, "disk_high_percent": 99.9,
                           "disk_low_percent": 99.8},
             "spool": {"min_free_percent": 0.0, "min_free_bytes": 0}}
    with running_node(tmp_path, extra=extra, port=free_port()) as node, \
            ledger_at(home) as ledger:
        wait_for(lambda: ledger.series_info(uid(1)).state == S.PURGED, 60,
                 what="the node's sweep")
        assert not (spool.root / STUDY / uid(1)).exists()
        assert len(list((spool.root / STUDY / uid(2)).iterdir())) == 2
        assert len(list((spool.root / STUDY / uid(3)).iterdir())) == 2
        deleted = wait_for(lambda: [json.loads(line) for line in node.log_text().splitlines()
                                    if '"retention.deleted"' in line], 30, what="its log")
        assert [(d["series_uid"], d["files"], d["reason"]) for d in deleted] == [
            (uid(1), 2, "age")]
        assert echoscu(node.port).returncode == 0

        refused = retention_cli(node.config, "run")
        assert refused.returncode == 1 and "node is running" in refused.stderr
        age(ledger, uid(3), 30)
        planned = retention_cli(node.config, "dry-run", "--json")
        assert planned.returncode == 0, planned.stderr
        assert [s["series_instance_uid"] for s in json.loads(planned.stdout)["series"]] == [
            uid(3)]
        assert len(list((spool.root / STUDY / uid(3)).iterdir())) == 2
    ran = retention_cli(tmp_path / "qcnode.toml", "run")
    assert ran.returncode == 0, ran.stderr
    assert f"deleted series {uid(3)}" in ran.stdout
    assert not (spool.root / STUDY / uid(3)).exists()
    with ledger_at(home) as ledger:
        assert ledger.series_info(uid(3)).state == S.PURGED
        assert ledger.series_info(uid(2)).state == S.FAILED



def test_run_refuses_while_the_journal_holds_unapplied_records(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with ledger_at(home) as ledger:
        spool_series(ledger, Spool(home / "spool", home), STUDY, uid(1), 1)
        age(ledger, uid(1), 30)
    journal = Journal(home / "journal", segment_bytes=1 << 20, segments=2)
    journal.open()
    writer = journal.writer()
    record = writer.begin()
    sop = f"{uid(1)}.0"
    record.write(memoryview(encode(template(), STUDY, uid(1), sop)))
    writer.commit(record, entry_meta(header(STUDY, uid(1), sop), "SENDER", "a1", "assess",
                                     "ct"))
    journal.close()  # a crash: the record is acknowledged, not applied
    config = write_config(tmp_path / "q.toml", {"node": {"home": str(home)},
                                                "retention": {"delivered_days": 7}})
    refused = retention_cli(config, "run")
    assert refused.returncode == 1 and "1 records not yet applied" in refused.stderr
    assert (home / "spool" / STUDY / uid(1)).is_dir()
    assert retention_cli(config, "dry-run").returncode == 0
