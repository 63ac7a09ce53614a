"""Batching across series in a GPU worker: several jobs' series assessed in one call.

A GPU worker with ``[engine] batch_series = N`` runs N task threads (Celery's threads
pool, prefetch 1 each): every task still belongs to one job, moves that job's ledger
state and acknowledges its own message after it ran, exactly as with one series at a
time. Only the engine call is shared: each thread hands its prepared series to the
process's :class:`SeriesBatcher` and waits; the first thread to arrive leads a batch,
waits at most ``max_wait`` seconds for companions (less if N series are already
there), and assesses them together with the engine's ``assess_many`` (the VLM fills its
read-out and generation batches across series); each thread gets its own result back.
A series never waits longer than ``max_wait`` for companions, and a failure of the
batched call is retried series by series, so one bad series fails only its own job.

Engines without ``assess_many`` (physics) are called series by series. Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from inference.engine import Engine
from inference.prepare import PreparedSeries
from inference.result import AssessmentResult

log = structlog.get_logger(__name__)


class BatchEngine(Protocol):
    """An engine that assesses several series in one call."""

    def assess_many(self, batch: Sequence[PreparedSeries]) -> list[AssessmentResult]:
        """One result per series, in order."""
        ...


@dataclass
class _Pending:
    series: PreparedSeries
    done: threading.Event = field(default_factory=threading.Event)
    result: AssessmentResult | None = None
    error: BaseException | None = None


class SeriesBatcher:
    """Collects series from concurrent callers and assesses them together."""

    def __init__(self, engine: Engine, max_series: int, max_wait: float) -> None:
        if max_series < 1 or max_wait < 0:
            raise ValueError("max_series must be >= 1 and max_wait >= 0")
        self.engine = engine
        self.max_series = max_series
        self.max_wait = max_wait
        self._lock = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False

    def assess(self, series: PreparedSeries) -> AssessmentResult:
        """Assess ``series`` (with whatever companions arrive in time); raises what the
        engine raised for this series."""
        if self.max_series == 1:
            return self.engine.assess(series)
        mine = _Pending(series)
        with self._lock:
            self._queue.append(mine)
            self._lock.notify_all()
            lead = not self._leading
            if lead:
                self._leading = True
        if lead:
            self._lead()
        mine.done.wait()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _lead(self) -> None:
        """Wait for companions, take a batch, run it; hand leadership on if more wait."""
        deadline = time.monotonic() + self.max_wait
        with self._lock:
            while len(self._queue) < self.max_series:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch, self._queue = self._queue[:self.max_series], self._queue[self.max_series:]
        try:
            self._run(batch)
        finally:
            with self._lock:
                self._leading = False
                if self._queue:  # a waiter that arrived meanwhile leads the next batch
                    self._leading = True
                    threading.Thread(target=self._lead, name="qcnode-batch",
                                     daemon=True).start()

    def _run(self, batch: list[_Pending]) -> None:
        many = getattr(self.engine, "assess_many", None)
        started = time.perf_counter()
        if callable(many) and len(batch) > 1:
            try:
                results = many([p.series for p in batch])
            except Exception as exc:  # noqa: BLE001 - retried alone: one series, one job
                log.warning("batch_failed_retrying_alone", series=len(batch),
                            error=type(exc).__name__)
            else:
                for p, result in zip(batch, results, strict=True):
                    p.result = result
                    p.done.set()
                log.info("batch_assessed", series=len(batch), together=True,
                         seconds=round(time.perf_counter() - started, 3))
                return
        for p in batch:
            try:
                p.result = self.engine.assess(p.series)
            except BaseException as exc:  # noqa: BLE001 - handed to the series' own thread
                p.error = exc
            p.done.set()
        if len(batch) > 1:
            log.info("batch_assessed", series=len(batch), together=False,
                     seconds=round(time.perf_counter() - started, 3))
