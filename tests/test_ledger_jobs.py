"""Ledger jobs and deliveries: idempotent keys, transitions, dead-letter, re-queue,
and a re-assessment that keeps both SRs visible. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

from node.ledger import (
    ConfirmedBy,
    DeliveryState,
    InvalidTransition,
    JobState,
    Ledger,
    NotFound,
    SeriesState,
)
from tests.test_ledger import make_record

SERIES = "1.2.3.4"
ENGINE = "physics|1.0|-|-"


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger.open(ledger_url) as led:
        led.record_instance(make_record(1, SERIES))
        assert led.close_series(SERIES, 1, "quiet")
        yield led


def test_create_job_is_idempotent(ledger: Ledger) -> None:
    first = ledger.create_job(SERIES, 1, ENGINE)
    again = ledger.create_job(SERIES, 1, ENGINE)
    assert first.id == again.id and first.state == JobState.PENDING
    other = ledger.create_job(SERIES, 1, "vlm|1|rev|adapter")
    assert other.id != first.id
    with pytest.raises(NotFound):
        ledger.create_job("9.9.9", 1, ENGINE)


def test_job_happy_path_and_transition_checks(ledger: Ledger) -> None:
    job = ledger.create_job(SERIES, 1, ENGINE)
    with pytest.raises(InvalidTransition):
        ledger.move_job(job.id, JobState.DONE)
    job = ledger.move_job(job.id, JobState.ASSESSING, task_id="t-1", count_attempt=True)
    job = ledger.move_job(job.id, JobState.ASSESSING, count_attempt=True)  # redelivered
    assert (job.attempts, job.task_id) == (2, "t-1")
    job = ledger.move_job(job.id, JobState.REPORTING, result_json='{"score": 3}')
    job = ledger.move_job(job.id, JobState.DELIVERING, sr_uid="2.25.1")
    job = ledger.move_job(job.id, JobState.DONE)
    assert job.finished_at is not None and job.result_json == '{"score": 3}'
    with pytest.raises(InvalidTransition):
        ledger.move_job(job.id, JobState.PENDING)


def test_deliveries(ledger: Ledger) -> None:
    job = ledger.create_job(SERIES, 1, ENGINE)
    d = ledger.create_delivery(job.id, "pacs")
    assert ledger.create_delivery(job.id, "pacs").id == d.id
    d = ledger.move_delivery(d.id, DeliveryState.FAILED, error="association refused",
                             count_attempt=True)
    d = ledger.move_delivery(d.id, DeliveryState.SENT, count_attempt=True)
    assert d.sent_at is not None and d.attempts == 2 and d.last_error == "association refused"
    d = ledger.move_delivery(d.id, DeliveryState.CONFIRMED, confirmed_by=ConfirmedBy.FIND)
    assert d.confirmed_by == ConfirmedBy.FIND and d.confirmed_at is not None
    with pytest.raises(InvalidTransition):
        ledger.move_delivery(d.id, DeliveryState.PENDING)
    assert [x.destination for x in ledger.deliveries_of(job.id)] == ["pacs"]


def test_dead_letter_listing_and_requeue(ledger: Ledger) -> None:
    ledger.set_series_state(SERIES, SeriesState.QUEUED, generation=1)
    job = ledger.create_job(SERIES, 1, ENGINE)
    ledger.move_job(job.id, JobState.ASSESSING, count_attempt=True)
    ledger.move_job(job.id, JobState.REPORTING)
    ledger.move_job(job.id, JobState.DELIVERING)
    d = ledger.create_delivery(job.id, "pacs")
    ledger.move_delivery(d.id, DeliveryState.DEAD, error="0xA900 rejected",
                         count_attempt=True)
    ledger.dead_letter_job(job.id, "delivery to pacs rejected permanently")
    assert ledger.series_info(SERIES).state == SeriesState.FAILED
    failures = ledger.list_failed()
    assert {(f.destination, f.state) for f in failures} == {(None, "dead"), ("pacs", "dead")}
    assert all(f.series_instance_uid == SERIES for f in failures)

    requeued = ledger.requeue(SERIES)
    assert [j.id for j in requeued] == [job.id]
    assert requeued[0].state == JobState.PENDING and requeued[0].attempts == 0
    assert ledger.get_delivery(d.id).state == DeliveryState.PENDING
    assert ledger.series_info(SERIES).state == SeriesState.QUEUED
    assert ledger.list_failed() == []
    assert ledger.requeue() == []


def test_requeue_keeps_an_assessed_result(ledger: Ledger) -> None:
    """A job dead-lettered in delivery goes back to reporting: its result is not redone."""
    ledger.set_series_state(SERIES, SeriesState.QUEUED, generation=1)
    job = ledger.create_job(SERIES, 1, ENGINE)
    ledger.move_job(job.id, JobState.ASSESSING, count_attempt=True)
    ledger.move_job(job.id, JobState.REPORTING, result_json='{"score": 3}')
    ledger.set_series_state(SERIES, SeriesState.REPORTING, generation=1)
    ledger.move_job(job.id, JobState.DELIVERING, sr_uid="2.25.7")
    d = ledger.create_delivery(job.id, "pacs")
    ledger.move_delivery(d.id, DeliveryState.DEAD, error="refused", count_attempt=True)
    ledger.dead_letter_job(job.id, "pacs: refused; gave up after 1 attempt(s)")
    (requeued,) = ledger.requeue()
    assert (requeued.state, requeued.result_json) == (JobState.REPORTING, '{"score": 3}')
    assert ledger.series_info(SERIES).state == SeriesState.REPORTING
    assert ledger.get_delivery(d.id).state == DeliveryState.PENDING


def test_waiting_delivery_lists_its_next_attempt(ledger: Ledger) -> None:
    job = ledger.create_job(SERIES, 1, ENGINE)
    d = ledger.create_delivery(job.id, "pacs")
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ledger.move_delivery(d.id, DeliveryState.FAILED, error="refused", count_attempt=True,
                         next_attempt_at=when)
    (failure,) = ledger.list_failed()
    assert (failure.destination, failure.attempts, failure.next_attempt_at) == (
        "pacs", 1, when)


def test_reassessment_keeps_both_srs(ledger: Ledger) -> None:
    old = ledger.create_job(SERIES, 1, ENGINE)
    for state in (JobState.ASSESSING, JobState.REPORTING, JobState.DELIVERING):
        ledger.move_job(old.id, state)
    ledger.move_job(old.id, JobState.DONE, sr_uid="2.25.100")
    ledger.add_series_event(SERIES, "sr_sent", job_id=old.id, sr_uid="2.25.100")

    ledger.record_instance(make_record(2, SERIES))  # late image: generation 2
    assert ledger.series_info(SERIES).generation == 2
    assert ledger.close_series(SERIES, 2, "quiet")
    assert ledger.previous_sr_uid(SERIES, 2) == "2.25.100"
    new = ledger.create_job(SERIES, 2, ENGINE)
    assert ledger.supersede_older_jobs(SERIES, 2) == 0  # the old one is done
    ledger.move_job(new.id, JobState.ASSESSING)
    ledger.move_job(new.id, JobState.REPORTING, sr_uid="2.25.200",
                    superseded_sr_uid="2.25.100")
    jobs = ledger.jobs_of_series(SERIES)
    assert [(j.generation, j.sr_uid, j.superseded_sr_uid) for j in jobs] == [
        (1, "2.25.100", None), (2, "2.25.200", "2.25.100")]
    events = [e.kind for e in ledger.series_history(SERIES)]
    assert events == ["closed", "sr_sent", "reopened", "closed"]


def test_supersede_unfinished_older_jobs(ledger: Ledger) -> None:
    old = ledger.create_job(SERIES, 1, ENGINE)
    ledger.move_job(old.id, JobState.ASSESSING)
    ledger.record_instance(make_record(2, SERIES))
    assert ledger.supersede_older_jobs(SERIES, 2) == 1
    assert ledger.get_job(old.id).state == JobState.SUPERSEDED


def test_series_transitions_are_checked(ledger: Ledger) -> None:
    with pytest.raises(InvalidTransition):
        ledger.set_series_state(SERIES, SeriesState.DELIVERED, generation=1)
    with pytest.raises(NotFound):
        ledger.set_series_state("9.9.9", SeriesState.QUEUED)
    assert ledger.set_series_state(SERIES, SeriesState.QUEUED, generation=1)
    assert ledger.set_series_state(SERIES, SeriesState.QUEUED, generation=1)  # repeated
    assert not ledger.set_series_state(SERIES, SeriesState.ASSESSING, generation=7)
    assert ledger.series_info(SERIES).state == SeriesState.QUEUED
    states = [(e.from_state, e.to_state) for e in ledger.series_history(SERIES)]
    assert states == [("receiving", "complete"), ("complete", "queued")]
