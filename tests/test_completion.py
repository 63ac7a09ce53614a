"""Series completion: quiet period after the associations closed, max wait, store rules,
per-rule timeouts, re-opening, callback failures and restart recovery.

Deterministic checks call ``check_once(now=...)`` with a chosen clock; the thread
tests use short timeouts and wait on conditions (no fixed sleeps).
"""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from structlog.testing import capture_logs

from node.config import CompletionSettings, RuleSettings, Settings
from node.ledger import Ledger, SeriesState
from node.ledger.models import utcnow
from node.store.completion import CompletionMonitor
from tests.support.net import wait_for
from tests.test_ledger import make_record

QUIET = 0.3


def settings(quiet: float = QUIET, max_wait: float = 60.0) -> Settings:
    return Settings(
        completion=CompletionSettings(quiet_seconds=quiet, max_wait_seconds=max_wait,
                                      poll_seconds=0.05),
        rules=(
            RuleSettings(name="ct", modalities=("CT",), action="assess"),
            RuleSettings(name="fast", modalities=("CT",), quiet_seconds=0.1,
                         max_wait_seconds=5.0),
            RuleSettings(name="other", action="store"),
        ),
    )


class Calls:
    """Collects on_complete calls and the series state seen at call time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.seen: list[tuple[str, str, SeriesState, int]] = []
        self.lock = threading.Lock()

    def __call__(self, series_uid: str, trigger: str) -> None:
        info = self.ledger.series_info(series_uid)
        with self.lock:
            self.seen.append((series_uid, trigger, info.state, info.generation))


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger.open(ledger_url) as led:
        yield led


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_quiet_waits_for_open_associations(ledger: Ledger) -> None:
    calls = Calls(ledger)
    monitor = CompletionMonitor(ledger, settings(), calls)
    ledger.association_opened("a", "SCANNER", "127.0.0.1")
    ledger.record_instance(make_record(1, assoc="a"))
    assert monitor.check_once(now=later(10)) == []  # association still open
    ledger.association_closed("a")
    assert monitor.check_once() == []  # not quiet long enough yet
    assert monitor.check_once(now=later(QUIET + 0.5)) == [("1.2.3.4", "quiet")]
    assert calls.seen == [("1.2.3.4", "quiet", SeriesState.COMPLETE, 1)]
    info = ledger.series_info("1.2.3.4")
    assert info.close_trigger == "quiet" and info.closed_at is not None
    assert monitor.check_once(now=later(100)) == []  # closes once


def test_max_wait_closes_while_association_open(ledger: Ledger) -> None:
    monitor = CompletionMonitor(ledger, settings(max_wait=30), Calls(ledger))
    ledger.association_opened("a", "SCANNER", "127.0.0.1")
    ledger.record_instance(make_record(1, assoc="a"))
    assert monitor.check_once(now=later(29)) == []
    assert monitor.check_once(now=later(31)) == [("1.2.3.4", "max_wait")]
    assert ledger.series_info("1.2.3.4").close_trigger == "max_wait"


def test_store_rule_is_ignored_and_rule_timeouts_apply(ledger: Ledger) -> None:
    calls = Calls(ledger)
    monitor = CompletionMonitor(ledger, settings(quiet=30), calls)
    ledger.record_instance(make_record(1, "1.2.5", action="store", rule="other"))
    ledger.record_instance(make_record(1, "1.2.6", rule="fast"))
    ledger.record_instance(make_record(1, "1.2.7", rule="ct"))
    closed = monitor.check_once(now=later(1))
    assert sorted(closed) == [("1.2.6", "quiet")]
    assert sorted(monitor.check_once(now=later(31))) == [("1.2.5", "quiet"), ("1.2.7", "quiet")]
    assert ledger.series_info("1.2.5").state == SeriesState.IGNORED
    assert sorted(calls.seen) == [
        ("1.2.5", "quiet", SeriesState.IGNORED, 1),
        ("1.2.6", "quiet", SeriesState.COMPLETE, 1),
        ("1.2.7", "quiet", SeriesState.COMPLETE, 1),
    ]


def test_monitor_thread_closes_and_reopens(ledger: Ledger) -> None:
    calls = Calls(ledger)
    with CompletionMonitor(ledger, settings(), calls) as monitor:
        ledger.association_opened("a", "SCANNER", "127.0.0.1")
        ledger.record_instance(make_record(1, assoc="a"))
        ledger.association_closed("a")
        monitor.wake()
        wait_for(lambda: calls.seen, timeout=15, what="first completion")
        ledger.record_instance(make_record(2, assoc="b"))  # arrives after completion
        wait_for(lambda: len(calls.seen) == 2, timeout=15, what="second completion")
        assert monitor.alive
    assert calls.seen == [
        ("1.2.3.4", "quiet", SeriesState.COMPLETE, 1),
        ("1.2.3.4", "quiet", SeriesState.COMPLETE, 2),
    ]
    assert ledger.series_info("1.2.3.4").instance_count == 2


def test_failing_callback_is_logged_without_details_and_monitor_lives(
    ledger: Ledger,
) -> None:
    good = Calls(ledger)

    def callback(series_uid: str, trigger: str) -> None:
        if series_uid == "1.2.3.4":
            raise ValueError("PatientName DOE^JANE")
        good(series_uid, trigger)

    with capture_logs() as logs, CompletionMonitor(ledger, settings(), callback) as monitor:
        ledger.record_instance(make_record(1))
        ledger.record_instance(make_record(1, "1.2.8"))
        wait_for(lambda: good.seen, timeout=15, what="the other series")
        wait_for(lambda: any(e["event"] == "completion.callback_failed" for e in logs),
                 timeout=15, what="the failure log")
        assert monitor.alive
    failed = [e for e in logs if e["event"] == "completion.callback_failed"]
    assert failed[0]["series_uid"] == "1.2.3.4" and failed[0]["error"] == "ValueError"
    assert "DOE" not in repr(logs)
    assert ledger.series_info("1.2.3.4").state == SeriesState.COMPLETE


def test_restart_recovers_open_and_unqueued_series(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as before:  # the node that "crashed"
        before.association_opened("a", "SCANNER", "127.0.0.1")
        before.record_instance(make_record(1, "1.2.10", assoc="a"))
        before.record_instance(make_record(1, "1.2.11", assoc="a"))
        assert before.close_series("1.2.11", 1, "quiet")  # closed, never queued
    with Ledger.open(ledger_url) as after:
        assert after.close_stale_associations() == 1
        calls = Calls(after)
        with CompletionMonitor(after, settings(), calls):
            wait_for(lambda: len(calls.seen) == 2, timeout=15, what="recovery")
    assert sorted(calls.seen) == [
        ("1.2.10", "quiet", SeriesState.COMPLETE, 1),
        ("1.2.11", "recovered", SeriesState.COMPLETE, 1),
    ]
