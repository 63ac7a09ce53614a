"""``qcnode status [--json]`` against a populated ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from node.ledger import DeliveryState, JobState, Ledger, SeriesState
from tests.test_ledger import make_record


def run_status(url: str, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QCNODE_LEDGER__URL": url, "QCNODE_NODE__HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "status", *extra], env=env, cwd=home,
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
    assert json.loads(empty.stdout)["series"] == []
    with Ledger.open(url) as ledger:
        populate(ledger)
    text = run_status(url, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "1.2.20" in text.stdout and "receiving" in text.stdout
    assert "failures: 2" in text.stdout and "rejected: 0xA900" in text.stdout


def test_status_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.sqlite3'}"
    with Ledger.open(url) as ledger:
        populate(ledger)
    result = run_status(url, tmp_path, "--json", "--limit", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["series"]) == 1 and sum(report["counts"].values()) == 2
