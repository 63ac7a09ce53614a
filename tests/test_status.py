"""``qcnode status [--json]`` against a populated ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from node.ledger import DeliveryState, JobState, Ledger, SeriesState
from tests.test_ledger import make_record


def run_status(url: str, home: Path, *args: str, env: dict[str, str] | None = None,
               command: str = "status", extra: tuple[str, ...] = (),
               ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QCNODE_LEDGER__URL": url, "QCNODE_NODE__HOME": str(home),
           **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", command, *args, *extra], env=env, cwd=home,
        capture_output=True, text=True, timeout=120, check=False,
    )


def populate(ledger: Ledger) -> None:
    for i in range(3):
        ledger.record_instance(make_record(i, "1.2.20"))
    ledger.record_instance(make_record(0, "1.2.21"))
    assert ledger.close_series("1.2.21", 1, "max_wait")
    ledger.set_series_state("1.2.21", SeriesState.QUEUED, generation=1)
    job = ledger.create_job("1.2.21", 1, "physics|1|-|-")
    ledger.move_job(job.id, JobState.ASSESSING)
    ledger.move_job(job.id, JobState.REPORTING)
    ledger.move_job(job.id, JobState.DELIVERING)
    delivery = ledger.create_delivery(job.id, "pacs")
    ledger.move_delivery(delivery.id, DeliveryState.DEAD, error="rejected: 0xA900",
                         count_attempt=True)
    ledger.dead_letter_job(job.id, "delivery failed")


def test_status_json(ledger_url: str, tmp_path: Path) -> None:
    with Ledger.open(ledger_url) as ledger:
        populate(ledger)
    result = run_status(ledger_url, tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    series = {s["series_instance_uid"]: s for s in report["series"]}
    assert series["1.2.20"]["state"] == "receiving"
    assert series["1.2.20"]["instance_count"] == 3
    assert series["1.2.20"]["trigger"] is None
    assert (series["1.2.21"]["state"], series["1.2.21"]["trigger"]) == ("failed", "max_wait")
    assert report["counts"]["receiving"] == 1 and report["counts"]["failed"] == 1
    assert sum(report["counts"].values()) == 2
    assert report["oldest_waiting"]["series_instance_uid"] == "1.2.20"
    failures = {(f["destination"], f["state"]): f for f in report["failures"]}
    assert failures[("pacs", "dead")]["last_error"] == "rejected: 0xA900"
    assert failures[(None, "dead")]["series_instance_uid"] == "1.2.21"


def test_status_text_and_empty_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    empty = run_status(url, tmp_path, "--json")
    assert empty.returncode == 0, empty.stderr
    report = json.loads(empty.stdout)
    assert report["series"] == []
    # The embedded broker is not created by asking: depths unknown, and why.
    assert not (tmp_path / "broker.sqlite3").exists()
    assert report["queues"] == {"gpu": None, "io": None}
    assert "broker.sqlite3 does not exist" in report["queues_note"]
    with Ledger.open(url) as ledger:
        populate(ledger)
    text = run_status(url, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "1.2.20" in text.stdout and "receiving" in text.stdout
    assert "failures: 2" in text.stdout and "rejected: 0xA900" in text.stdout
    assert "queue depths: gpu ?, io ? (embedded broker" in text.stdout
    assert not (tmp_path / "broker.sqlite3").exists()


def test_status_shows_kept_report_without_destinations(tmp_path: Path) -> None:
    """A job done with zero deliveries: status names the kept file, per series."""
    url = f"sqlite:///{tmp_path / 'k.sqlite3'}"
    with Ledger.open(url) as ledger:
        ledger.record_instance(make_record(0, "1.2.30", study="1.2.3"))
        assert ledger.close_series("1.2.30", 1, "quiet")
        job = ledger.create_job("1.2.30", 1, "physics|1|-|-")
        for state in (JobState.ASSESSING, JobState.REPORTING):
            ledger.move_job(job.id, state)
        ledger.move_job(job.id, JobState.DELIVERING, sr_uid="1.2.99",
                        report_path="1.2.3/1.2.99.dcm")
        ledger.move_job(job.id, JobState.DONE)
    report = json.loads(run_status(url, tmp_path, "--json").stdout)
    (entry,) = report["series"]
    kept = tmp_path.resolve() / "reports" / "1.2.3" / "1.2.99.dcm"
    assert (entry["sr_uid"], entry["report_path"]) == ("1.2.99", str(kept))
    assert entry["destinations"] == 0
    assert entry["note"] == f"no destinations; report kept at {kept}"
    text = run_status(url, tmp_path).stdout
    assert f"  no destinations; report kept at {kept}" in text


def test_status_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.sqlite3'}"
    with Ledger.open(url) as ledger:
        populate(ledger)
    result = run_status(url, tmp_path, "--json", "--limit", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["series"]) == 1 and sum(report["counts"].values()) == 2


def test_status_shows_a_waiting_delivery(tmp_path: Path) -> None:
    """A delivery waiting for its next attempt: "attempt n of N failed, next at T"."""
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with Ledger.open(url) as ledger:
        ledger.record_instance(make_record(0, "1.2.40"))
        assert ledger.close_series("1.2.40", 1, "quiet")
        job = ledger.create_job("1.2.40", 1, "physics|1|-|-")
        for state in (JobState.ASSESSING, JobState.REPORTING, JobState.DELIVERING):
            ledger.move_job(job.id, state)
        delivery = ledger.create_delivery(job.id, "pacs")
        for _ in range(2):
            ledger.move_delivery(delivery.id, DeliveryState.FAILED, count_attempt=True,
                                 error="pacs: connection refused", next_attempt_at=when)
    env = {"QCNODE_DELIVERY__MAX_ATTEMPTS": "5"}
    report = json.loads(run_status(url, tmp_path, "--json", env=env).stdout)
    (failure,) = report["failures"]
    assert failure["next_attempt_at"] == when.isoformat() and failure["max_attempts"] == 5
    text = run_status(url, tmp_path, env=env).stdout
    assert (f"→ pacs waiting: attempt 2 of 5 failed, next at {when.isoformat()}: "
            "pacs: connection refused") in text
    retry = run_status(url, tmp_path, env=env, command="retry", extra=("1.2.40",))
    assert retry.returncode == 1 and "nothing to re-queue for 1.2.40" in retry.stderr
    assert (f"1.2.40 → pacs: attempt 2 of 5 failed, next at {when.isoformat()} "
            "(retried by itself)") in retry.stderr
