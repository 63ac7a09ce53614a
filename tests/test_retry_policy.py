"""The retry policy (:mod:`node.pipeline.retry`) and the tasks' dead-letter safety net."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from celery.exceptions import Retry

from node.config import DeliverySettings, Settings
from node.ledger import JobState, Ledger, SeriesState
from node.pipeline.retry import backoff, backoff_base, plan_retry
from node.pipeline.tasks import _dead_letter_unhandled
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


def test_unhandled_task_error_dead_letters_the_job(tmp_path: Path) -> None:
    """A task failing in a way it did not handle leaves the job dead, not in its stage."""
    settings = Settings.model_validate(
        {"ledger": {"url": f"sqlite:///{tmp_path / 'l.sqlite3'}"}, "node": {"home": tmp_path}})
    with Ledger.open(settings.ledger_url) as ledger:
        ledger.record_instance(make_record(0, "1.2.50"))
        assert ledger.close_series("1.2.50", 1, "quiet")
        ledger.set_series_state("1.2.50", SeriesState.QUEUED, generation=1)
        job = ledger.create_job("1.2.50", 1, "physics|1|-|-")
        ledger.move_job(job.id, JobState.ASSESSING, count_attempt=True)
        with pytest.raises(Retry), _dead_letter_unhandled(settings, job.id, "assessment"):
            raise Retry("again later", None)
        assert ledger.get_job(job.id).state == JobState.ASSESSING, "a retry passes through"
        with pytest.raises(RuntimeError), _dead_letter_unhandled(settings, job.id, "report"):
            raise RuntimeError("boom")
        dead = ledger.get_job(job.id)
        assert dead.state == JobState.DEAD
        assert dead.last_error == "report: unexpected RuntimeError"
        assert ledger.series_info("1.2.50").state == SeriesState.FAILED
