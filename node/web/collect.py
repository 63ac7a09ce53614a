"""Metrics read at scrape time: series by state, queue depths, journal backlog, disk.

A custom prometheus-client collector: every scrape asks the ledger (one grouped count),
the journal applier's state file, the spool's disk, and — at most every
:data:`QUEUE_CACHE_SECONDS`, since it opens a broker connection — the broker.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from node.config import Settings
from node.ledger import Ledger, SeriesState
from node.logs import get_logger
from node.store.ingest import STATE_FILE

log = get_logger(__name__)
QUEUE_CACHE_SECONDS = 5.0

Depths = Callable[[Settings], dict[str, int | None]]


class StateCollector:
    """Gauges of the node's state, computed when Prometheus scrapes."""

    def __init__(self, settings: Callable[[], Settings], ledger: Callable[[], Ledger | None],
                 depths: Depths) -> None:
        self._settings, self._ledger, self._depths = settings, ledger, depths
        self._lock = threading.Lock()
        self._queues: tuple[float, dict[str, int | None]] = (-QUEUE_CACHE_SECONDS, {})

    def collect(self) -> Iterator[Any]:
        """The gauge families (called by the registry on every scrape)."""
        from prometheus_client.core import GaugeMetricFamily

        settings = self._settings()
        series = GaugeMetricFamily("qcnode_series", "Series by state", labels=["state"])
        ledger = self._ledger()
        if ledger is not None:
            counts = ledger.series_counts()
            for state in SeriesState:
                series.add_metric([state.value], counts.get(state, 0))
        yield series
        queues = GaugeMetricFamily("qcnode_queue_depth", "Messages waiting per queue",
                                   labels=["queue"])
        for queue, depth in self.queue_depths(settings).items():
            if depth is not None:
                queues.add_metric([queue], depth)
        yield queues
        backlog = journal_backlog(settings)
        if backlog is not None:
            yield GaugeMetricFamily("qcnode_journal_backlog",
                                    "Images acknowledged, not yet in the spool and ledger",
                                    value=backlog)
        usage = shutil.disk_usage(settings.spool_dir if settings.spool_dir.exists()
                                  else settings.node.home)
        yield GaugeMetricFamily("qcnode_disk_free_bytes", "Free bytes on the spool's disk",
                                value=usage.free)
        yield GaugeMetricFamily("qcnode_disk_total_bytes", "Size of the spool's disk",
                                value=usage.total)
        yield GaugeMetricFamily("qcnode_disk_watermark_bytes",
                                "Free bytes below which images are refused (0xA700)",
                                value=watermark_bytes(settings, usage.total))

    def queue_depths(self, settings: Settings) -> dict[str, int | None]:
        """The queues' depths, asked of the broker at most every few seconds."""
        with self._lock:
            at, depths = self._queues
            if time.monotonic() - at < QUEUE_CACHE_SECONDS:
                return depths
            try:
                depths = self._depths(settings)
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail on the broker
                log.warning("queue_depths_failed", error=type(exc).__name__)
                depths = {}
            self._queues = (time.monotonic(), depths)
            return depths


def journal_backlog(settings: Settings) -> int | None:
    """Images the journal applier last reported waiting (None before it ever wrote)."""
    path = settings.node.home / "journal" / STATE_FILE
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["waiting"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def watermark_bytes(settings: Settings, total: int) -> int:
    """The spool's free-space watermark in bytes (the larger of its two settings)."""
    spool = settings.spool
    return max(int(spool.min_free_bytes), int(total * spool.min_free_percent / 100.0))
