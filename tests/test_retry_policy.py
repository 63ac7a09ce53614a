"""The retry policy (:mod:`node.pipeline.retry`) and the tasks' dead-letter safety net."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from celery.exceptions import Retry

from node.config import DeliverySettings, Settings
from node.ledger import JobState, Ledger, SeriesState
from node.pipeline.app import TASK_REPORT, create_app
from node.pipeline.retry import backoff, backoff_base, plan_retry
from node.pipeline.tasks import _retry_unhandled, register
from tests.test_ledger import make_record

POLICY = DeliverySettings(max_attempts=5, backoff_initial_seconds=0.4,
                          backoff_max_seconds=1.6)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    assert [backoff_base(n, POLICY) for n in (1, 2, 3, 4, 5)] == [0.4, 0.8, 1.6, 1.6, 1.6]
    for attempt in (1, 2, 3, 4):
        delays = [backoff(attempt, POLICY) for _ in range(200)]
        base = backoff_base(attempt, POLICY)
        assert all(0.5 * base <= d <= base for d in delays)
        assert max(delays) - min(delays) > 0.25 * base, "jittered"


def test_plan_retry_stops_at_max_attempts() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    plans = [plan_retry(n, POLICY, now) for n in range(1, 6)]
    assert [p.attempt for p in plans if p is not None] == [1, 2, 3, 4]
    assert plans[-1] is None, "attempt 5 of 5 failed: dead letter"
    first = plans[0]
    assert first is not None
    assert first.next_at == now + dt.timedelta(seconds=first.delay)
    assert first.describe().startswith("attempt 1 of 5, next at 2030-01-01T00:00:0")


def test_unhandled_task_error_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    """A task failing in a way it did not handle: retried by the policy, then dead.

    Before, such a failure left the job in its stage and its series waiting forever.
    """
    settings = Settings.model_validate(
        {"ledger": {"url": f"sqlite:///{tmp_path / 'l.sqlite3'}"}, "node": {"home": tmp_path},
         "delivery": {"max_attempts": 3}})
    app = create_app(settings)
    register(app, settings)
    task = app.tasks[TASK_REPORT]
    with Ledger.open(settings.ledger_url) as ledger:
        ledger.record_instance(make_record(0, "1.2.50"))
        assert ledger.close_series("1.2.50", 1, "quiet")
        ledger.set_series_state("1.2.50", SeriesState.QUEUED, generation=1)
        job = ledger.create_job("1.2.50", 1, "physics|1|-|-")
        ledger.move_job(job.id, JobState.ASSESSING, count_attempt=True)
        ledger.move_job(job.id, JobState.REPORTING, result_json="{}")
        with pytest.raises(Retry), _retry_unhandled(task, settings, job.id, "report"):
            raise Retry("again later", None)
        assert ledger.get_job(job.id).state == JobState.REPORTING, "a retry passes through"
        with pytest.raises(Retry), _retry_unhandled(task, settings, job.id, "report"):
            raise RuntimeError("boom\nsecond line")
        waiting = ledger.get_job(job.id)
        assert (waiting.state, waiting.attempts) == (JobState.FAILED, 2)
        assert waiting.last_error is not None
        # the error by its class and where it was raised, never its message (node.redact)
        assert waiting.last_error.startswith("report: unexpected RuntimeError at ")
        assert "; attempt 2 of 3, next at " in waiting.last_error
        assert "boom" not in waiting.last_error
        with pytest.raises(RuntimeError), _retry_unhandled(task, settings, job.id, "report"):
            raise RuntimeError("boom")
        dead = ledger.get_job(job.id)
        assert (dead.state, dead.attempts) == (JobState.DEAD, 3)
        assert dead.last_error is not None
        assert dead.last_error.startswith("report: unexpected RuntimeError at ")
        assert "boom" not in dead.last_error
        assert ledger.series_info("1.2.50").state == SeriesState.FAILED
