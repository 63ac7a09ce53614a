"""Prometheus metrics of the node (prometheus-client), and the recent rejections.

Two kinds of numbers:

* **Events**, counted where they happen: associations accepted / rejected (by reason),
  images answered (by C-STORE status), assessments and deliveries (duration histograms
  per engine and destination, delivery failures). The listener and the embedded workers
  are separate processes, so ``qcnode serve`` points every process it starts at one
  directory (``<home>/run/metrics``, prometheus-client's multiprocess mode) and exposes
  their sum. A ``qcnode worker`` on another host counts into its own process only.
* **State**, read when Prometheus scrapes (:mod:`node.web.collect`): series by state,
  queue depths, journal backlog, disk free.

The metric objects are created on first use (:func:`metrics`), because prometheus-client
decides at import time whether it writes to the multiprocess directory: ``qcnode serve``
sets ``PROMETHEUS_MULTIPROC_DIR`` (:func:`use_directory`) before anything counts.

No label carries patient data: AE titles of rejected callers are kept only in the
in-memory :class:`Rejections` table the web console shows, never in a metric label
(an unbounded label set would also grow the time series without end).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: C-STORE / C-ECHO statuses by name (PS3.4 B.2.3, PS3.7 C): the ``status`` label.
STATUS_NAMES = {
    0x0000: "success", 0x0122: "sop_class_not_supported", 0x0124: "not_authorized",
    0xA700: "out_of_resources", 0xA900: "dataset_does_not_match_sop_class",
}
#: Buckets for assessment / delivery durations (seconds).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def status_name(status: int) -> str:
    """The ``status`` label of a DIMSE status code (0xC2xx: cannot_understand, …)."""
    if status in STATUS_NAMES:
        return STATUS_NAMES[status]
    if status & 0xF000 == 0xC000:
        return "cannot_understand"
    if status & 0xFF00 == 0xA700:
        return "out_of_resources"
    return f"0x{status:04X}"


def use_directory(path: Path) -> None:
    """Count into ``path`` from now on, in this process and the processes it starts.

    Emptied first: the files of a previous run's processes would otherwise be added.
    Must be called before :func:`metrics` is first called.
    """
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


@dataclass(frozen=True)
class Metrics:
    """The node's event metrics (see the module doc for labels)."""

    associations: Any
    images: Any
    assessments: Any
    deliveries: Any
    delivery_failures: Any
    http_refused: Any


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    """The metric objects, created once per process (after :func:`use_directory`)."""
    from prometheus_client import Counter, Histogram

    return Metrics(
        associations=Counter("qcnode_associations", "Associations by result and reason",
                             ["result", "reason"]),
        images=Counter("qcnode_images", "C-STORE requests answered, by status", ["status"]),
        assessments=Histogram("qcnode_assessment_seconds", "Assessment duration per series",
                              ["engine"], buckets=DURATION_BUCKETS),
        deliveries=Histogram("qcnode_delivery_seconds", "Report delivery duration",
                             ["destination"], buckets=DURATION_BUCKETS),
        delivery_failures=Counter("qcnode_delivery_failures",
                                  "Failed delivery attempts", ["destination"]),
        http_refused=Counter("qcnode_http_refused", "Web API requests refused",
                             ["reason"]),
    )


@dataclass
class Rejected:
    """One kind of rejected caller: who, from where, why; how often and when last."""

    calling_ae: str
    host: str
    reason: str
    count: int
    first_seen: float
    last_seen: float


class Rejections:
    """Rejected associations of the last ``window`` seconds, grouped by (AE, host, reason).

    Kept in the listener's memory for the web console ("which scanner is misconfigured"):
    at most ``limit`` groups, the least recently seen dropped first.
    """

    def __init__(self, window: float = 86_400.0, limit: int = 1000) -> None:
        self.window, self.limit = window, limit
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[str, str, str], Rejected] = OrderedDict()

    def add(self, calling_ae: str, host: str, reason: str) -> None:
        """Count one rejection."""
        now = time.time()
        key = (calling_ae, host, reason)
        with self._lock:
            group = self._groups.pop(key, None) or Rejected(calling_ae, host, reason, 0, now, now)
            group.count += 1
            group.last_seen = now
            self._groups[key] = group
            while len(self._groups) > self.limit:
                self._groups.popitem(last=False)

    def recent(self) -> list[Rejected]:
        """The groups seen within the window, most recent first."""
        cutoff = time.time() - self.window
        with self._lock:
            for key in [k for k, g in self._groups.items() if g.last_seen < cutoff]:
                del self._groups[key]
            return sorted(self._groups.values(), key=lambda g: -g.last_seen)


#: The listener process's table (one listener per process).
REJECTIONS = Rejections()


def rejected(calling_ae: str, host: str, reason: str) -> None:
    """Count a rejected association (metric by reason; table by AE, host, reason)."""
    metrics().associations.labels("rejected", reason).inc()
    REJECTIONS.add(calling_ae, host, reason)


def accepted() -> None:
    """Count an accepted association."""
    metrics().associations.labels("accepted", "").inc()
