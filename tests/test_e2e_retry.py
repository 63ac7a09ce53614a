"""Delivery retries and worker deaths end to end: attempts, backoff, dead letter, retry.

Real ``qcnode serve`` processes with their embedded workers (SQLite broker), a real
Orthanc stopped and started again as the PACS, DCMTK storescu. ``[delivery]`` runs a
short backoff (fractions of a second) so a whole retry window fits in a test.

Every test here failed on the code before the fix: Celery's ``task.retry(max_retries=None)``
meant its default of 3 retries, so a delivery stopped after attempt 4 whatever
``max_attempts`` said (a: no 5th attempt; b: never ``failed``; c: 4 attempts, not 6),
and an assessment whose worker was killed was re-dispatched without limit (d: the 4th
run assessed and delivered).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from node.ledger import DeliveryState, JobState, SeriesState
from node.pipeline.retry import backoff_base
from node.status import render_text
from tests.support.e2e import (
    NODE_AE,
    NodeSite,
    children,
    kill_tree,
    series_uid_of,
    storescu,
    synth_series,
)
from tests.support.net import wait_for
from tests.support.orthanc import Orthanc, running_orthanc
from tests.test_e2e_faults import delivery_failures, one_sr, qcnode, status

TIMEOUT = 120.0
#: Time a retry may take beyond its countdown besides rebuilding the SR: the worker's
#: timer, ledger reads, the refused connection (2 shared cores, other tests running).
SLACK_SECONDS = 2.0
#: Longer log lines than this hold more than an event (e.g. encoded task arguments).
MAX_LOG_LINE = 8192


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_series(tmp_path_factory.mktemp("small"), slices=12, size=128, seed=5)


@pytest.fixture(scope="module")
def long_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 slices of 256²: assessing all of them takes seconds (a window to kill in)."""
    return synth_series(tmp_path_factory.mktemp("long"), slices=40, size=256, seed=3)


@pytest.fixture()
def pacs(tmp_path: Path) -> Any:
    with running_orthanc(tmp_path / "orthanc", {NODE_AE: 104}) as server:
        yield server


def attempts_made(site: NodeSite, uid: str) -> int:
    """Delivery attempts recorded so far for the series (0 before the first)."""
    return max((d.attempts for j in site.ledger.jobs_of_series(uid)
                for d in site.ledger.deliveries_of(j.id)), default=0)


def log_events(site: NodeSite, event: str) -> list[dict[str, Any]]:
    """JSON log events named ``event`` from every log of the site."""
    return [e for path in site.home.glob("*.log")
            for line in path.read_text(errors="replace").splitlines()
            if line.startswith("{") and f'"{event}"' in line
            for e in [json.loads(line)] if e.get("event") == event]


def assert_no_task_arguments_logged(site: NodeSite) -> None:
    """No log line carries a task's arguments (before: Celery's MaxRetriesExceededError
    line held them, 30 KB for this small series, ~300 KB for a clinical one)."""
    for path in site.home.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            assert "Can't retry" not in line and len(line) < MAX_LOG_LINE, line[:300]


def wait_failed(site: NodeSite, uid: str, timeout: float = TIMEOUT) -> None:
    """Wait until the series is ``failed``; fail at once if it was delivered instead."""
    def failed() -> bool:
        state = site.state(uid)
        assert state != SeriesState.DELIVERED, "delivered: nothing was dead-lettered"
        return state == SeriesState.FAILED
    wait_for(failed, timeout=timeout, interval=0.1, what=f"series failed\n{site.logs()}")


def at(event: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(str(event["timestamp"]))


def test_pacs_back_within_window_gets_sr_once(tmp_path: Path, pacs: Orthanc,
                                              small_series: Path) -> None:
    """(a) The PACS comes back after attempt 5 of 8: the SR arrives by itself, once.

    Before: attempt 5 never came (Celery gave up after 4), the series stayed
    ``reporting`` until the node was restarted.
    """
    pacs.stop()
    # Delays after attempts 1..7 are 0.5, 1, 2, 4, 8, 8, 8 s × [½, 1]: from attempt 5
    # on, at least 12 s for Orthanc to start before the last attempt.
    site = NodeSite(tmp_path / "home", pacs, max_attempts=8, backoff=(0.5, 8.0))
    try:
        site.start()
        storescu(small_series, site.port)
        uid = series_uid_of(small_series)
        wait_for(lambda: attempts_made(site, uid) >= 2, timeout=TIMEOUT, interval=0.1,
                 what=f"2 refused delivery attempts\n{site.logs()}")
        report = status(site)
        (waiting,) = [f for f in report["failures"] if f["destination"] == "pacs"]
        assert waiting["state"] == "failed" and waiting["next_attempt_at"] is not None
        assert waiting["max_attempts"] == 8
        text = render_text(report)
        assert "→ pacs waiting: attempt" in text and " of 8 failed, next at " in text, text
        wait_for(lambda: attempts_made(site, uid) >= 5, timeout=TIMEOUT, interval=0.1,
                 what=f"5 refused delivery attempts\n{site.logs()}")
        assert site.state(uid) == SeriesState.REPORTING
        pacs.start()
        site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
        one_sr(site, uid)
        job = site.job(uid)
        (delivery,) = site.ledger.deliveries_of(job.id)
        assert 6 <= delivery.attempts <= 8 and delivery.state == DeliveryState.CONFIRMED
        failures = delivery_failures(site, job.id)
        assert [f["attempt"] for f in failures] == list(range(1, delivery.attempts))
        assert len([e for e in log_events(site, "sent") if e.get("job_id") == job.id]) == 1
        sent = [e for e in site.ledger.series_history(uid) if e.kind == "sr_sent"]
        assert len(sent) == 1
    finally:
        site.stop()


def test_pacs_away_past_window_dead_letters_then_retry(tmp_path: Path, pacs: Orthanc,
                                                       small_series: Path) -> None:
    """(b) The PACS stays away for all 6 attempts: dead letter, ``qcnode retry --failed``.

    Before: the job stayed ``delivering`` and its series ``reporting`` after attempt 4;
    counts said ``failed 0`` and ``qcnode retry --failed`` found nothing to re-queue.
    """
    pacs.stop()
    site = NodeSite(tmp_path / "home", pacs, max_attempts=6, backoff=(0.2, 0.5))
    try:
        site.start()
        storescu(small_series, site.port)
        uid = series_uid_of(small_series)
        wait_failed(site, uid)
        job = site.job(uid)
        (delivery,) = site.ledger.deliveries_of(job.id)
        assert (job.state, delivery.state, delivery.attempts) == (
            JobState.DEAD, DeliveryState.DEAD, 6)
        assert job.last_error is not None and "gave up after 6 attempt(s)" in job.last_error
        report = status(site)
        assert report["counts"].get("failed") == 1
        (failure,) = [f for f in report["failures"] if f["destination"] == "pacs"]
        assert (failure["state"], failure["attempts"]) == ("dead", 6)
        assert_no_task_arguments_logged(site)
        pacs.start()
        run = qcnode(site, "retry", "--failed")
        assert run.returncode == 0, run.stderr
        assert f"re-queued {uid}" in run.stdout
        site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
        one_sr(site, uid)
        report = status(site)
        assert report["failures"] == [] and not report["counts"].get("failed")
        assert len(log_events(site, "assessed")) == 1, "re-queued to its report, not re-assessed"
    finally:
        site.stop()


def test_attempts_and_delays_follow_policy(tmp_path: Path, pacs: Orthanc,
                                           small_series: Path) -> None:
    """(c) ``max_attempts`` = 6 attempts exactly; each delay is the configured backoff.

    Before: 4 attempts (Celery's default limit), then nothing.
    """
    pacs.stop()
    site = NodeSite(tmp_path / "home", pacs, max_attempts=6, backoff=(0.4, 1.6))
    policy = site.settings.delivery
    try:
        site.start()
        storescu(small_series, site.port)
        uid = series_uid_of(small_series)
        wait_failed(site, uid)
        job = site.job(uid)
        (delivery,) = site.ledger.deliveries_of(job.id)
        assert delivery.attempts == 6
        failures = delivery_failures(site, job.id)
        assert [f["attempt"] for f in failures] == [1, 2, 3, 4, 5, 6]
        assert all(f["transient"] and f["max_attempts"] == 6 for f in failures)
        assert failures[-1]["retry_in"] is None, "the last attempt is not retried"
        # The first attempt builds and keeps the SR; each retry sends the kept files
        # (before: rebuilt every time, 6 builds). Neither is part of the delay.
        builds = [e for e in log_events(site, "sr_built") if e.get("job_id") == job.id]
        reuses = [e for e in log_events(site, "sr_reused") if e.get("job_id") == job.id]
        assert (len(builds), len(reuses)) == (1, 5)
        assert {e["report_path"] for e in reuses} == {builds[0]["report_path"]}
        for (before, after), build in zip(itertools.pairwise(failures), sorted(reuses, key=at),
                                          strict=True):
            base = backoff_base(before["attempt"], policy)
            delay = float(before["retry_in"])
            assert 0.5 * base - 0.001 <= delay <= base + 0.001, (before, base)
            gap = (at(after) - at(before)).total_seconds()
            waited = gap - float(build["seconds"])
            assert delay <= gap and waited <= delay + SLACK_SECONDS, (before, after, build)
        assert_no_task_arguments_logged(site)
    finally:
        site.stop()


def _assessing(site: NodeSite, uid: str, attempt: int) -> bool:
    jobs = site.ledger.jobs_of_series(uid)
    if jobs and jobs[0].attempts > attempt:
        raise AssertionError(f"attempt {jobs[0].attempts} started; waited for {attempt}")
    return bool(jobs) and jobs[0].state == JobState.ASSESSING and jobs[0].attempts == attempt


def test_worker_killed_every_assessment_dead_letters(tmp_path: Path, pacs: Orthanc,
                                                     long_series: Path) -> None:
    """(d) The assessment kills its worker 3 times (max_attempts 3): dead letter, reason.

    Kill 1 and 3 take the whole gpu worker (SIGKILL to it and its pool: the node
    replaces it and re-dispatches); kill 2 only the pool process running the task (what
    the OOM killer picks: Celery requeues the message). Before: re-dispatched every
    time, the 4th run assessed and delivered.
    """
    site = NodeSite(tmp_path / "home", pacs, engine='name = "physics"\nslices = 40',
                    max_attempts=3)
    try:
        site.start()
        storescu(long_series, site.port)
        uid = series_uid_of(long_series)
        for attempt in (1, 2, 3):
            wait_for(partial(_assessing, site, uid, attempt), timeout=TIMEOUT,
                     interval=0.05, what=f"assessment attempt {attempt}\n{site.logs()}")
            worker = site.embedded_worker("gpu")
            if attempt == 2:
                (pool,) = children(worker)
                kill_tree(pool)
            else:
                kill_tree(worker)
        wait_failed(site, uid)
        job = site.job(uid)
        assert job.state == JobState.DEAD and job.attempts == 3
        assert job.last_error is not None and "worker died" in job.last_error
        assert "gave up after 3 attempt(s)" in job.last_error
        assert site.ledger.series_info(uid).last_error == job.last_error
        assert log_events(site, "assessed") == []
        assert len(log_events(site, "assessment_worker_lost")) == 2
        (failure,) = status(site)["failures"]
        assert failure["state"] == "dead" and "worker died" in failure["last_error"]
        assert pacs.find_modality("SR") == []
    finally:
        site.stop()


def test_restart_keeps_the_waiting_delivery_schedule(tmp_path: Path, pacs: Orthanc,
                                                     small_series: Path) -> None:
    """The node is killed while a delivery waits 30–60 s for its retry, then restarted.

    The restart re-dispatches the report; it waits for the planned time instead of
    trying at once, and the PACS (back by then) gets the SR once, at attempt 2.
    Before: the re-dispatched report tried at once, seconds after the restart.
    """
    pacs.stop()
    # Delay 30–60 s: longer than a restart on a loaded host (its io worker took ~15 s
    # to take the re-dispatched report), so an immediate try would come before it.
    site = NodeSite(tmp_path / "home", pacs, max_attempts=3, backoff=(60.0, 60.0))
    try:
        site.start()
        storescu(small_series, site.port)
        uid = series_uid_of(small_series)
        wait_for(lambda: attempts_made(site, uid) >= 1, timeout=TIMEOUT, interval=0.1,
                 what=f"a refused delivery attempt\n{site.logs()}")
        (delivery,) = site.ledger.deliveries_of(site.job(uid).id)
        planned = delivery.next_attempt_at
        assert planned is not None
        site.kill_node()
        pacs.start()
        site.start()
        site.wait_state(uid, SeriesState.DELIVERED, timeout=TIMEOUT)
        one_sr(site, uid)
        (delivery,) = site.ledger.deliveries_of(site.job(uid).id)
        assert delivery.attempts == 2
        (sent,) = [e for e in log_events(site, "sent") if e.get("job_id") == delivery.job_id]
        assert at(sent) >= planned, (sent, planned)
        assert log_events(site, "delivery_not_due"), "the re-dispatched report waited"
    finally:
        site.stop()
