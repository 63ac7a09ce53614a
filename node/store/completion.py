"""Series completion: decide when a received series is whole, from the ledger alone.

DICOM has no "end of series" message (a C-STORE, PS3.4 Annex B, carries one instance;
an association may carry part of a series or several series), so a series closes:

``quiet``
    when none of the associations that delivered its instances is still open and no
    instance arrived for the quiet period (``RuleSettings.quiet_seconds``, else
    ``CompletionSettings.quiet_seconds``);
``max_wait``
    when ``max_wait_seconds`` passed since the first instance of its current
    generation, whatever is still arriving (a sender that never releases).
``mpps_completed`` / ``mpps_discontinued``
    at once, without the quiet period, when a Modality Performed Procedure Step that
    lists the series ended (COMPLETED / DISCONTINUED, PS3.4 Annex F.7) and every
    instance it lists for the series is in the ledger (:mod:`node.ledger.mpps`,
    received by :mod:`node.receive.mpps`).

Closing moves the series to ``complete`` — or ``ignored`` when its rule's action is
``store`` — and then calls ``on_complete(series_uid, trigger)``; the callback should
look at the series' state. All state lives in the ledger, so a restarted node simply
resumes: open series keep their timers (associations left open by a crash are closed
by :meth:`~node.ledger.Ledger.close_stale_associations` at startup), and series that
were closed but never queued are handed to ``on_complete`` again once at start
(trigger ``recovered``; job creation is idempotent).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from types import TracebackType

from node.config import Settings
from node.ledger import Ledger, OpenSeries, SeriesState
from node.ledger.models import utcnow
from node.ledger.mpps import MppsDue
from node.logs import get_logger
from node.redact import error_fields

TRIGGER_QUIET = "quiet"
TRIGGER_MAX_WAIT = "max_wait"
TRIGGER_RECOVERED = "recovered"
ACTION_STORE = "store"

OnComplete = Callable[[str, str], None]
log = get_logger(__name__)


class CompletionMonitor:
    """A thread that closes series (see the module documentation).

    Use as a context manager (``with CompletionMonitor(...) as monitor:``) or call
    :meth:`start` / :meth:`stop`. :meth:`check_once` does one pass synchronously.
    """

    def __init__(
        self, ledger: Ledger, settings: Settings, on_complete: OnComplete, *,
        replay_complete: bool = True,
    ) -> None:
        self._ledger = ledger
        self._settings = settings
        self._on_complete = on_complete
        self._replay = replay_complete
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def use_settings(self, settings: Settings) -> None:
        """Take reloaded settings (rules' quiet and max-wait times) from the next pass."""
        self._settings = settings

    # Lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the monitor thread (once)."""
        if self._thread is not None:
            raise RuntimeError("completion monitor already started")
        self._thread = threading.Thread(target=self._run, name="qcnode-completion", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it (a pass in progress finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Check now rather than at the next poll (e.g. when an association closed)."""
        self._wake.set()

    def __enter__(self) -> CompletionMonitor:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """True while the monitor thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self._replay:
            self._guarded(self.replay_complete)
        poll = self._settings.completion.poll_seconds
        while not self._stop.is_set():
            self._guarded(self.check_once)
            self._wake.wait(poll)
            self._wake.clear()

    def _guarded(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 — a database hiccup must not end completion
            log.error("completion.pass_failed", **error_fields(exc))

    # One pass -----------------------------------------------------------------------
    def check_once(self, now: dt.datetime | None = None) -> list[tuple[str, str]]:
        """Close every series that is due; returns ``(series_uid, trigger)`` closed."""
        now = now or utcnow()
        closed: list[tuple[str, str]] = []
        by_mpps = self._ledger.mpps_due()
        for series in self._ledger.open_series():
            due = by_mpps.get(series.series_instance_uid)
            trigger = self._close_by_mpps(series, due) if due is not None else None
            trigger = trigger or self._close_if_due(series, now)
            if trigger is not None:
                closed.append((series.series_instance_uid, trigger))
                self._notify(series.series_instance_uid, trigger)
        return closed

    def _close_if_due(self, series: OpenSeries, now: dt.datetime) -> str | None:
        quiet, max_wait = self.timeouts(series.rule)
        ignore = series.action == ACTION_STORE
        uid, generation = series.series_instance_uid, series.generation
        if now - series.generation_started_at >= max_wait:
            if self._ledger.close_series(uid, generation, TRIGGER_MAX_WAIT, ignore=ignore):
                return TRIGGER_MAX_WAIT
            return None
        if series.busy or now - series.last_instance_at < quiet:
            return None
        if self._ledger.close_series(
            uid, generation, TRIGGER_QUIET, quiet_since=now - quiet, ignore=ignore
        ):
            return TRIGGER_QUIET
        return None

    def _close_by_mpps(self, series: OpenSeries, due: MppsDue) -> str | None:
        if self._ledger.close_series_by_mpps(due, series.generation,
                                             ignore=series.action == ACTION_STORE):
            return due.trigger
        return None

    def timeouts(self, rule_name: str) -> tuple[dt.timedelta, dt.timedelta]:
        """``(quiet, max_wait)`` for a rule: its own values, else the defaults."""
        defaults = self._settings.completion
        quiet, max_wait = defaults.quiet_seconds, defaults.max_wait_seconds
        for rule in self._settings.rules:
            if rule.name == rule_name:
                quiet = rule.quiet_seconds if rule.quiet_seconds is not None else quiet
                if rule.max_wait_seconds is not None:
                    max_wait = rule.max_wait_seconds
                break
        return dt.timedelta(seconds=quiet), dt.timedelta(seconds=max_wait)

    def replay_complete(self) -> list[str]:
        """Hand series closed but never queued (a crash in between) to ``on_complete``."""
        uids = [s.series_instance_uid
                for s in self._ledger.list_series(states=(SeriesState.COMPLETE,))]
        for uid in uids:
            self._notify(uid, TRIGGER_RECOVERED)
        return uids

    def _notify(self, series_uid: str, trigger: str) -> None:
        log.info("series.closed", series_uid=series_uid, trigger=trigger)
        try:
            self._on_complete(series_uid, trigger)
        except Exception as exc:  # noqa: BLE001 — a bad callback must not stop the monitor
            log.error("completion.callback_failed", series_uid=series_uid, **error_fields(exc))

