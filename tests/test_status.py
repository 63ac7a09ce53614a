"""``qcnode status [--json]`` against a populated ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

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


def _site(tmp_path: Path) -> tuple[Path, Path]:
    """A node home with one assessed series (spool file with Series Number 7, a job
    with score 3.0) and a settings file naming that home; returns (config, home)."""
    home = tmp_path / "nodehome"
    record = make_record(0, "1.2.40", study="1.2.4")
    spool_file = home / "spool" / record.relpath
    spool_file.parent.mkdir(parents=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = record.sop_class_uid, record.sop_instance_uid
    ds.SeriesInstanceUID = "1.2.40"
    ds.SeriesNumber = 7
    ds.save_as(spool_file, enforce_file_format=True)
    with Ledger.open(f"sqlite:///{home / 'ledger.sqlite3'}") as ledger:
        ledger.record_instance(record)
        ledger.record_instance(make_record(0, "1.2.41", study="1.2.4"))  # not assessed
        assert ledger.close_series("1.2.40", 1, "quiet")
        job = ledger.create_job("1.2.40", 1, "physics|1|-|-")
        ledger.move_job(job.id, JobState.ASSESSING)
        ledger.move_job(job.id, JobState.REPORTING, result_json=json.dumps({"score": 3.0}))
    config = tmp_path / "etc" / "qcnode.toml"
    config.parent.mkdir()
    config.write_text(f'[node]\nhome = "{home}"\n')
    return config, home


def _status(cwd: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QCNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "status", *extra], env={**clean, **env}, cwd=cwd,
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_status_from_any_directory_shows_description_number_score(tmp_path: Path) -> None:
    """Found through $QCNODE_CONFIG from an unrelated directory (the default search of
    ``serve``), not the built-in defaults' ``./var``; each series with its Series
    Description, Series Number and score."""
    config, _ = _site(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _status(elsewhere, {"QCNODE_CONFIG": str(config)}, "--json")
    assert result.returncode == 0, result.stderr
    series = {s["series_instance_uid"]: s for s in json.loads(result.stdout)["series"]}
    assert series["1.2.40"]["description"] == "chest"
    assert (series["1.2.40"]["series_number"], series["1.2.40"]["score"]) == (7, 3.0)
    assert series["1.2.40"]["score_label"] == "good"
    assert (series["1.2.41"]["series_number"], series["1.2.41"]["score"]) == (None, None)
    text = _status(elsewhere, {}, "--config", str(config)).stdout
    assert "NO. SCORE  DESCRIPTION" in text
    row = next(line for line in text.splitlines() if line.startswith("1.2.40 "))
    assert row.split()[-3:] == ["7", "3.0", "chest"]
    assert not (elsewhere / "var").exists()


def test_status_without_the_node_home_says_so(tmp_path: Path) -> None:
    """The settings name a relative home that does not exist from this directory:
    status says which home it looked for and exits 1, creating nothing."""
    config = tmp_path / "etc" / "qcnode.toml"
    config.parent.mkdir()
    config.write_text('[node]\nhome = "var"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _status(elsewhere, {"QCNODE_CONFIG": str(config)})
    assert result.returncode == 1
    assert f"node home {elsewhere / 'var'} does not exist (relative" in result.stderr
    assert f"settings {config}" in result.stderr and result.stdout == ""
    assert list(elsewhere.iterdir()) == []


def test_status_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """``qcnode status | head -1``: the reader is gone before status writes."""
    config, _ = _site(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "node.cli", "status", "--config", str(config)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


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
