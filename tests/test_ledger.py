"""Ledger: migrations, instance recording, versions, re-opening, concurrency.

Every test runs on SQLite and on the local PostgreSQL (fixture ``ledger_url``).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from node.ledger import (
    InstanceRecord,
    Ledger,
    LedgerError,
    SeriesState,
    VersionConflict,
)
from node.ledger.db import MIGRATIONS_DIR, downgrade, upgrade
from node.ledger.models import Base

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TABLES = {
    "studies", "series", "instances", "associations", "series_associations", "jobs",
    "deliveries", "series_events", "commitments", "mpps_steps", "mpps_series",
    "alembic_version",
}


def make_record(i: int, series: str = "1.2.3.4", *, version: int = 1, sha: str = "a",
                assoc: str = "assoc-1", action: str = "assess", rule: str = "ct",
                study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{i}", sop_class_uid=CT_IMAGE,
        series_instance_uid=series, study_instance_uid=study, modality="CT",
        series_description="chest", transfer_syntax_uid=EXPLICIT_LE,
        relpath=f"{study}/{series}/{series}.{i}.v{version}.dcm", size=1000 + i,
        sha256=(sha * 64)[:64], calling_ae="SCANNER", assoc_id=assoc, version=version,
        action=action, rule=rule,
    )


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger.open(ledger_url) as led:
        yield led


# Migrations -------------------------------------------------------------------------
def test_migration_from_empty_database_matches_models(ledger_url: str) -> None:
    led = Ledger(ledger_url)
    try:
        assert not set(inspect(led.engine).get_table_names()) & TABLES
        upgrade(led.engine)
        assert set(inspect(led.engine).get_table_names()) >= TABLES
        with led.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert context.get_current_revision() == "0004"
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        downgrade(led.engine, "base")
        assert not set(inspect(led.engine).get_table_names()) - {"alembic_version"}
        upgrade(led.engine)  # and up again, idempotent with open()
    finally:
        led.close()
    with Ledger.open(ledger_url) as again:
        assert again.versions_of("1.2.3") == []


def test_migrations_run_from_any_directory(ledger_url: str, tmp_path: Path) -> None:
    """No alembic.ini and no repo-relative path: the installed package migrates."""
    code = "import sys; from node.ledger import Ledger; Ledger.open(sys.argv[1]).close()"
    subprocess.run([sys.executable, "-c", code, ledger_url], cwd=tmp_path, check=True,
                   timeout=120)
    with Ledger(ledger_url) as led:
        assert set(inspect(led.engine).get_table_names()) >= TABLES


def test_migration_files_are_package_data() -> None:
    """Every migration file matches a [tool.setuptools.package-data] glob of `node`."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["node"]
    node_dir = root / "node"
    files = [p for p in MIGRATIONS_DIR.rglob("*.py") if "__pycache__" not in p.parts]
    assert any(p.name == "env.py" for p in files)
    for path in files:
        rel = path.relative_to(node_dir)
        assert any(rel.match(g) for g in globs), f"{rel} is not shipped as package data"


# Recording --------------------------------------------------------------------------
def test_record_creates_study_series_and_counts(ledger: Ledger) -> None:
    ledger.association_opened("assoc-1", "SCANNER", "127.0.0.1")
    for i in range(5):
        ledger.record_instance(make_record(i))
    info = ledger.series_info("1.2.3.4")
    assert info.state == SeriesState.RECEIVING
    assert info.instance_count == 5
    assert info.study_instance_uid == "1.2.3"
    assert (info.modality, info.rule, info.action, info.generation) == ("CT", "ct", "assess", 1)
    assert info.first_instance_at.tzinfo is not None
    assert info.first_instance_at.utcoffset() == dt.timedelta(0)
    assert info.first_instance_at <= info.last_instance_at
    assert ledger.known_relpaths() == {make_record(i).relpath for i in range(5)}
    assert len(ledger.instance_relpaths("1.2.3.4")) == 5


def test_duplicate_same_bytes_is_a_no_op(ledger: Ledger) -> None:
    rec = make_record(1)
    ledger.record_instance(rec)
    ledger.record_instance(rec)
    assert ledger.versions_of(rec.sop_instance_uid) == [(1, rec.sha256)]
    assert ledger.series_info(rec.series_instance_uid).instance_count == 1


def test_versions_and_conflicts(ledger: Ledger) -> None:
    v1 = make_record(1, sha="a")
    ledger.record_instance(v1)
    clash = make_record(1, sha="b")  # same version number, other bytes, other path
    clash = InstanceRecord(**{**clash.__dict__, "relpath": "other.dcm"})
    with pytest.raises(VersionConflict):
        ledger.record_instance(clash)
    v2 = make_record(1, sha="b", version=2)
    ledger.record_instance(v2)
    assert ledger.versions_of(v1.sop_instance_uid) == [(1, v1.sha256), (2, v2.sha256)]
    assert ledger.series_info(v1.series_instance_uid).instance_count == 1
    assert ledger.instance_relpaths(v1.series_instance_uid) == [v2.relpath]
    taken = InstanceRecord(**{**make_record(9).__dict__, "relpath": v1.relpath})
    with pytest.raises(LedgerError):
        ledger.record_instance(taken)
    assert ledger.versions_of(taken.sop_instance_uid) == []


def test_late_instance_reopens_a_closed_series(ledger: Ledger) -> None:
    ledger.record_instance(make_record(1))
    assert ledger.close_series("1.2.3.4", 1, "quiet")
    ledger.set_series_state("1.2.3.4", SeriesState.QUEUED, generation=1)
    ledger.record_instance(make_record(2))
    info = ledger.series_info("1.2.3.4")
    assert (info.state, info.generation, info.reopen_count) == (SeriesState.RECEIVING, 2, 1)
    assert info.instance_count == 2 and info.close_trigger is None
    # the stale generation's worker finds out
    assert not ledger.set_series_state("1.2.3.4", SeriesState.ASSESSING, generation=1)
    kinds = [(e.kind, e.from_state, e.to_state, e.generation)
             for e in ledger.series_history("1.2.3.4")]
    assert kinds == [
        ("closed", "receiving", "complete", 1),
        ("state", "complete", "queued", 1),
        ("reopened", "queued", "receiving", 2),
    ]


def test_associations(ledger: Ledger) -> None:
    ledger.association_opened("a", "SCANNER", "127.0.0.1")
    ledger.association_opened("b", "SCANNER", "127.0.0.1")
    ledger.record_instance(make_record(1, assoc="a"))
    assert ledger.open_series()[0].busy
    ledger.association_closed("a")
    assert not ledger.open_series()[0].busy
    assert ledger.close_stale_associations() == 1  # "b"
    assert ledger.close_stale_associations() == 0


# Concurrency ------------------------------------------------------------------------
def _record_many(url: str, worker: int, count: int) -> None:
    with Ledger(url) as led:
        assoc = f"assoc-{worker}"
        led.association_opened(assoc, "SCANNER", "127.0.0.1")
        for i in range(count):
            series = f"1.2.3.{i % 3 + 1}"
            led.record_instance(make_record(worker * 10_000 + i, series, assoc=assoc,
                                            study=f"1.2.9.{i % 2}"))
        led.association_closed(assoc)


def test_concurrent_threads_and_processes(ledger: Ledger) -> None:
    """Threads in this process and two other processes record at the same time."""
    threads, per_worker = 6, 40
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            _record_many(ledger.url, worker, per_worker)
        except BaseException as exc:
            errors.append(exc)

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(ledger.url, 100 + n, per_worker))
             for n in range(2)]
    for p in procs:
        p.start()
    pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    for p in procs:
        p.join(120)
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0, 0]
    total = (threads + len(procs)) * per_worker
    assert len(ledger.known_relpaths()) == total
    counts = {s.series_instance_uid: s.instance_count for s in ledger.list_series()}
    assert sum(counts.values()) == total and len(counts) == 3
    assert all(not s.busy for s in ledger.open_series())


def test_record_instance_speed(ledger: Ledger) -> None:
    """Not a benchmark (see bench/ledger.py): catches an order-of-magnitude regression."""
    import time

    ledger.record_instance(make_record(0))
    samples = []
    for i in range(1, 101):
        start = time.perf_counter()
        ledger.record_instance(make_record(i))
        samples.append(time.perf_counter() - start)
    samples.sort()
    assert samples[len(samples) // 2] < 0.02, f"median {samples[50] * 1000:.2f} ms"


def test_concurrent_open_migrates_once(ledger_url: str) -> None:
    """Several processes starting at once: each opens the ledger, none fails."""
    code = "import sys; from node.ledger import Ledger; Ledger.open(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, ledger_url]) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    with Ledger(ledger_url) as led, led.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0004"


def test_close_series_checks_hold_at_closing_time(ledger: Ledger) -> None:
    ledger.association_opened("a", "SCANNER", "127.0.0.1")
    ledger.record_instance(make_record(1, assoc="a"))
    past = ledger.series_info("1.2.3.4").last_instance_at - dt.timedelta(seconds=1)
    future = ledger.series_info("1.2.3.4").last_instance_at + dt.timedelta(seconds=1)
    assert not ledger.close_series("1.2.3.4", 1, "quiet", quiet_since=past)  # too recent
    assert not ledger.close_series("1.2.3.4", 1, "quiet", quiet_since=future)  # assoc open
    ledger.association_closed("a")
    assert not ledger.close_series("1.2.3.4", 2, "quiet", quiet_since=future)  # generation
    assert ledger.close_series("1.2.3.4", 1, "quiet", quiet_since=future)
    assert not ledger.close_series("1.2.3.4", 1, "quiet")  # no longer receiving


def test_constructor_does_not_migrate(ledger_url: str) -> None:
    with Ledger(ledger_url) as led:
        assert not set(inspect(led.engine).get_table_names()) & TABLES


def test_rolled_back_study_is_not_remembered(ledger: Ledger) -> None:
    """A failed record (here a version conflict) rolls back its new study row too."""
    ledger.record_instance(make_record(1, sha="a"))
    clash = InstanceRecord(**{**make_record(1, sha="b").__dict__, "relpath": "x.dcm",
                              "study_instance_uid": "1.2.77"})
    with pytest.raises(VersionConflict):
        ledger.record_instance(clash)
    ledger.record_instance(make_record(5, "1.2.78", study="1.2.77"))  # FK must hold
    assert ledger.series_info("1.2.78").study_instance_uid == "1.2.77"


def test_failures_in_a_shared_commit_stay_with_their_caller(ledger: Ledger) -> None:
    """Concurrent callers (SQLite: one group commit) — a conflicting record raises in
    its own thread, leaves no series behind, and does not undo the others."""
    ledger.record_instance(make_record(1, sha="a"))
    workers = 12
    barrier = threading.Barrier(workers)
    outcome: dict[int, str] = {}

    def run(n: int) -> None:
        if n % 2:
            rec = InstanceRecord(**{**make_record(1, sha="b").__dict__,
                                    "relpath": f"clash-{n}.dcm",
                                    "series_instance_uid": f"1.2.66.{n}"})
        else:
            rec = make_record(n, f"1.2.55.{n}")
        barrier.wait(30)
        try:
            ledger.record_instance(rec)
            outcome[n] = "ok"
        except VersionConflict:
            outcome[n] = "conflict"

    pool = [threading.Thread(target=run, args=(n,)) for n in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert outcome == {n: "conflict" if n % 2 else "ok" for n in range(workers)}
    uids = {s.series_instance_uid for s in ledger.list_series()}
    assert uids == {"1.2.3.4"} | {f"1.2.55.{n}" for n in range(0, workers, 2)}
