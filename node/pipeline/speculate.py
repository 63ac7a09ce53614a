"""Speculative preparation: prepare a series during its quiet period, not after it.

A series closes only after its quiet period (no open association, no new instance for
``quiet_seconds``). Preparing it (headers of every file, screened decodes, windowing:
1–2 s for 300 slices) can start as soon as its associations are released and it has
been quiet for a short lead time. :meth:`Speculator.take` hands the result to the
dispatcher at completion only if the series' files are still exactly those prepared
(same relative paths, so no instance or new version arrived since); otherwise the
dispatcher prepares again. The work is wasted only for a series that receives more
images after its senders let go, which is rare.

Memory: an entry lives from its preparation until :meth:`Speculator.take` (at dispatch),
and at most :data:`MAX_CACHED` entries are kept (≈ 15 MB each for 8 windowed 512²
slices and their payload). A preparation still running when the series is dispatched is
waited for (same files) or discarded (other files or too slow), and a series no longer
``receiving`` is not prepared: no entry can outlive its dispatch. (Before this, a
preparation that finished after its series was dispatched stayed cached until evicted,
≈ 15 MB per series up to 8 series: the serve process grew 156 → 380 MiB over 8 series.)
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import structlog

from inference.prepare import PreparedSeries
from node.ledger import Ledger, NotFound, OpenSeries, SeriesState
from node.ledger.models import utcnow

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.1
#: Prepared series kept at most (8 windowed 512² slices and payload ≈ 15 MB each).
MAX_CACHED = 4
#: How long :meth:`Speculator.take` waits for a running preparation of the same files.
TAKE_WAIT_SECONDS = 60.0
#: Start when the series has been quiet this long (or half its quiet period if shorter).
LEAD_SECONDS = 0.5

Prepare = Callable[[list[Path]], PreparedSeries]
Key = tuple[str, ...]
#: A prepared series and its task payload (:meth:`PreparedSeries.to_bytes`, ~1 s for 8
#: slices of 512², so it is made ahead of time too).
Ready = tuple[PreparedSeries, bytes]


class Speculator:
    """A thread preparing quiet, not yet complete series (a context manager)."""

    def __init__(self, ledger: Ledger, spool: Path, prepare: Prepare,
                 quiet_seconds: float) -> None:
        self._ledger = ledger
        self._spool = spool
        self._prepare = prepare
        self._lead = dt.timedelta(seconds=min(LEAD_SECONDS, quiet_seconds / 2))
        self._cache: OrderedDict[str, tuple[Key, Ready | None]] = OrderedDict()
        #: Guards ``_cache``, ``_inflight`` and ``_discard``; notified when a preparation ends.
        self._cond = threading.Condition()
        self._inflight: tuple[str, Key] | None = None
        self._discard = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qcnode-speculate",
                                        daemon=True)

    def __enter__(self) -> Speculator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __len__(self) -> int:
        """How many series are cached (prepared, or failed to prepare) right now."""
        with self._cond:
            return len(self._cache)

    @property
    def idle(self) -> bool:
        """True when no preparation is running."""
        with self._cond:
            return self._inflight is None

    def key(self, series_uid: str) -> Key:
        """What identifies the series' content: its files' relative paths, sorted."""
        return tuple(sorted(self._ledger.instance_relpaths(series_uid)))

    def prepared_key(self, series_uid: str) -> Key | None:
        """The files the series was last prepared from (None if not prepared)."""
        with self._cond:
            cached = self._cache.get(series_uid)
        return cached[0] if cached is not None and cached[1] is not None else None

    def take(self, series_uid: str, key: Key,
             wait: float = TAKE_WAIT_SECONDS) -> Ready | None:
        """The series prepared from exactly ``key``'s files (and its payload), or None.

        Removes the series' entry. If the series is being prepared from ``key`` right
        now, waits up to ``wait`` seconds for it; a preparation of the series still
        running after that (or from other files) is discarded when it ends.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._inflight != (series_uid, key), timeout=wait)
            if self._inflight is not None and self._inflight[0] == series_uid:
                self._discard = True
            cached = self._cache.pop(series_uid, None)
        if cached is None or cached[0] != key:
            return None
        return cached[1]

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                for series in self._ledger.open_series():
                    if self._stop.is_set():
                        return
                    if self._due(series, utcnow()):
                        self._speculate(series.series_instance_uid)
            except Exception as exc:  # noqa: BLE001 - an optimisation must never stop the node
                log.warning("speculation_failed", error=type(exc).__name__)

    def _due(self, series: OpenSeries, now: dt.datetime) -> bool:
        return (series.action == "assess" and not series.busy
                and now - series.last_instance_at >= self._lead)

    def _receiving(self, series_uid: str) -> bool:
        try:
            return self._ledger.series_info(series_uid).state == SeriesState.RECEIVING
        except NotFound:
            return False

    def _speculate(self, series_uid: str) -> None:
        key = self.key(series_uid)
        with self._cond:
            cached = self._cache.get(series_uid)
            if cached is not None and cached[0] == key:
                return
            self._inflight, self._discard = (series_uid, key), False
        ready: Ready | None = None
        keep = False
        try:
            # Checked after marking the work in flight: a take() before this point
            # follows the series' closing, so the check sees it; a later one sees
            # ``_inflight`` and waits or discards.
            keep = self._receiving(series_uid)
            if keep:
                ready = self._ready(series_uid, key)
        finally:
            with self._cond:
                if keep and not self._discard:
                    self._cache[series_uid] = (key, ready)
                    self._cache.move_to_end(series_uid)
                    while len(self._cache) > MAX_CACHED:
                        self._cache.popitem(last=False)
                elif keep:
                    log.debug("speculation_discarded", series_uid=series_uid)
                self._inflight, self._discard = None, False
                self._cond.notify_all()

    def _ready(self, series_uid: str, key: Key) -> Ready | None:
        try:
            prepared = self._prepare([self._spool / p for p in key])
            return prepared, prepared.to_bytes()
        except Exception as exc:  # noqa: BLE001 - dispatch prepares again and reports it
            log.info("speculation_skipped", series_uid=series_uid, error=type(exc).__name__)
            return None
