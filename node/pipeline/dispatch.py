"""Dispatch from the ledger (runs in the listener's process; never imports torch).

:class:`Dispatcher` turns a completed series into a job row and a ``gpu`` task: it
prepares the slices (decode, select, window: CPU, on the host that has the spool) in a
background thread, then enqueues by task name. The ledger is the source of truth: at
start-up :meth:`Dispatcher.redispatch` re-sends every unfinished job, and
``qcnode retry`` re-queues dead-lettered ones; tasks are idempotent, so a job sent
twice still yields one SR.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import structlog
from celery import Celery
from celery.result import AsyncResult
from kombu.connection import Connection

from inference.engine import engine_window
from inference.prepare import PreparedSeries, prepare_series
from inference.result import AssessmentResult
from node.config import Settings
from node.ledger import JobInfo, JobState, Ledger, SeriesState
from node.pipeline.app import GPU, IO, TASK_ASSESS, TASK_REPORT, create_app, queue_name
from node.pipeline.payload import b64, encode_sources, engine_key
from node.pipeline.reports import destinations_of, encode_image, wanted_companions, worst_image
from node.pipeline.speculate import Speculator
from node.redact import error_fields, error_text
from sr_writer.sources import referenced_uids

log = structlog.get_logger(__name__)

ACTIVE_SERIES = (SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.ASSESSING,
                 SeriesState.REPORTING)
FINISHED_JOBS = (JobState.DONE, JobState.SUPERSEDED, JobState.DEAD)
REPORT_STAGES = (JobState.REPORTING, JobState.DELIVERING)
REDISPATCH_SERIES = (SeriesState.QUEUED, SeriesState.ASSESSING, SeriesState.REPORTING)


class Dispatcher:
    """Sends series to the workers; ``on_complete`` is the completion monitor's hook."""

    def __init__(self, settings: Settings, ledger: Ledger, app: Celery | None = None, *,
                 speculate: bool = False) -> None:
        self.settings = settings
        self.ledger = ledger
        self.app = app if app is not None else create_app(settings)
        self.engine_key = engine_key(settings)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcnode-dispatch")
        #: The dispatch thread's broker connection (see :meth:`_send`).
        self._connection: Connection | None = None
        self._speculator: Speculator | None = None
        if speculate:
            self._speculator = Speculator(ledger, settings.spool_dir, self._prepare,
                                          settings.completion.quiet_seconds).__enter__()

    def close(self) -> None:
        """Stop speculating, finish queued preparations and stop the thread."""
        if self._speculator is not None:
            self._speculator.__exit__(None, None, None)
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._drop_connection()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_complete(self, series_uid: str, trigger: str) -> None:
        """Hook for the completion monitor: dispatch in the background, return at once."""
        self.submit(series_uid)

    def submit(self, series_uid: str) -> Future[None]:
        """Prepare and enqueue ``series_uid`` in the dispatch thread."""
        return self._pool.submit(self._dispatch_logged, series_uid)

    def _dispatch_logged(self, series_uid: str) -> None:
        try:
            self.dispatch(series_uid)
            release_free_memory()
        except Exception as exc:  # noqa: BLE001 - recorded; the ledger keeps the series
            log.error("dispatch_failed", series_uid=series_uid, **error_fields(exc))
            for job in self.ledger.jobs_of_series(series_uid):
                if job.state not in FINISHED_JOBS:
                    self.ledger.dead_letter_job(job.id, f"dispatch: {error_text(exc)}")

    def _send(self, name: str, args: list[Any], **options: Any) -> AsyncResult:
        """Send a task on the dispatcher's own broker connection; after a failure, on a
        new connection, once more.

        Not through the app's connection and producer pools: a pooled producer whose
        channel kombu had closed (its ``connection`` set to None) came back from the
        pool after a broker error and every later send failed with ``'NoneType' object
        has no attribute 'client'`` (seen on the embedded SQLite broker while the
        workers started). Sending a task twice is harmless (tasks are idempotent).
        """
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = self.app.connection_for_write()
            try:
                return self.app.send_task(name, args=args, connection=self._connection,
                                          **options)
            except Exception as exc:
                self._drop_connection()
                if attempt == 2:
                    raise
                log.warning("dispatch_retry", task=name, **error_fields(exc))
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()  # type: ignore[no-untyped-call]

    def dispatch(self, series_uid: str) -> JobInfo | None:
        """Create (or find) the series' current job and send it to its next stage."""
        info = self.ledger.series_info(series_uid)
        if info.action != "assess" or info.state not in ACTIVE_SERIES:
            return None
        job = self.ledger.create_job(series_uid, info.generation, self.engine_key)
        self.ledger.supersede_older_jobs(series_uid, info.generation)
        if job.state in FINISHED_JOBS:
            return job
        key = tuple(sorted(self.ledger.instance_relpaths(series_uid)))
        paths = [self.settings.spool_dir / p for p in key]
        if job.state in REPORT_STAGES and job.result_json:
            self._send_report(job, paths)
            return job
        started = time.perf_counter()
        ready = self._speculator.take(series_uid, key) if self._speculator else None
        if ready is None:
            prepared = self._prepare(paths)
            payload = prepared.to_bytes()
        else:
            prepared, payload = ready
        uids = [s.sop_instance_uid for s in prepared.slices]
        sources = encode_sources(_by_uid(paths, uids), uids)
        if info.state == SeriesState.COMPLETE:
            self.ledger.set_series_state(series_uid, SeriesState.QUEUED,
                                         generation=info.generation)
        sent = self._send(TASK_ASSESS, [job.id, b64(payload), sources])
        log.info("job_queued", series_uid=series_uid, job_id=job.id, task_id=sent.id,
                 prepare_seconds=round(time.perf_counter() - started, 3),
                 speculated=ready is not None)
        return self.ledger.move_job(job.id, JobState.PENDING if job.state == JobState.PENDING
                                    else job.state, task_id=sent.id)

    def _send_report(self, job: JobInfo, paths: list[Path]) -> None:
        result = AssessmentResult.from_json(job.result_json or "")
        uids = list(referenced_uids(result))
        sources = encode_sources(_by_uid(paths, uids), uids)
        wanted = wanted_companions(destinations_of(
            self.settings, self.ledger.series_info(job.series_instance_uid)))
        image = encode_image(worst_image(self._prepare(paths), result)) \
            if "pdf" in wanted else None
        self._send(TASK_REPORT, [job.id, sources, b64(image) if image else None],
                   queue=queue_name(self.settings, IO))
        log.info("report_requeued", series_uid=job.series_instance_uid, job_id=job.id)

    def _prepare(self, paths: list[Path]) -> PreparedSeries:
        window = engine_window(self.settings.engine.name, model=self.settings.engine.model,
                               adapter=self.settings.engine.adapter)
        return prepare_series(paths, k=self.settings.engine.slices, window=window)

    def redispatch(self, stage: str | None = None) -> int:
        """Send unfinished jobs again (after a start, or a worker's death). Returns how many.

        ``stage`` ``gpu`` re-sends series being assessed, ``io`` those being reported;
        None (start-up) every queued, assessing or reporting series. Series merely
        ``complete`` are left to the completion monitor's replay. Tasks are idempotent:
        a job whose message survived is done once and skipped the second time.
        """
        states = {GPU: (SeriesState.ASSESSING,),
                  IO: (SeriesState.REPORTING,)}.get(stage or "", REDISPATCH_SERIES)
        count = 0
        for info in self.ledger.list_series(states=states):
            if info.action == "assess":
                self.submit(info.series_instance_uid)
                count += 1
        log.info("redispatched", stage=stage or "all", series=count)
        return count

    def retry(self, series_uid: str | None = None) -> list[JobInfo]:
        """Re-queue dead-lettered jobs (one series, or all) and dispatch them."""
        jobs = self.ledger.requeue(series_uid)
        for job in jobs:
            self.submit(job.series_instance_uid).result()
        return jobs


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``, or None on another C library."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``).

    Preparing a series (decoding, windowing, compressing the payload) allocates and
    frees ≈ 100 MB; glibc keeps the freed memory in its arenas, so without this the
    serve process stays ≈ 90 MiB above what it uses (measured: 273 vs 184 MiB after
    10 series of 200 512² images, see docs/benchmarks.md). A no-op elsewhere.
    """
    if _TRIM is not None:
        _TRIM()


def _by_uid(paths: list[Path], uids: list[str]) -> dict[str, Path]:
    """The files of the instances ``uids``.

    Spool files are named ``<SOP Instance UID>.dcm`` (``.vN.dcm`` for a later version):
    the named file is checked by reading its header; other files are read only when a
    name does not lead to the instance.
    """
    newest: dict[str, tuple[int, Path]] = {}
    for path in paths:
        stem, _, version = path.name.removesuffix(".dcm").partition(".v")
        rank = int(version) if version.isdigit() else 1
        if stem not in newest or rank > newest[stem][0]:
            newest[stem] = (rank, path)
    found: dict[str, Path] = {}
    for uid in uids:
        if uid in newest and _sop_uid(newest[uid][1]) == uid:
            found[uid] = newest[uid][1]
    if len(found) < len(set(uids)):
        for path in paths:
            found.setdefault(_sop_uid(path), path)
    return found


def _sop_uid(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)
