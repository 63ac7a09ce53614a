"""The worker side: ``qcnode.assess`` (queue ``gpu``) and ``qcnode.report`` (queue ``io``).

Tasks take a ledger job ID plus everything they need in the message (prepared slices,
source headers), so workers need no shared disk. Both are idempotent: they look at the
job's state first, a redelivered ``assess`` whose result is recorded goes straight to
reporting, and a redelivered ``report`` sends the same SR again (UIDs derive from the
job key; the PACS keeps one instance). Every object built is kept under
``<home>/reports`` before it is sent (:func:`node.pipeline.reports.keep_reports`); the
job row records the SR's path, and a rebuild finds the same file.

One retry policy (:mod:`node.pipeline.retry`): jittered exponential backoff from
``[delivery]``, named non-retryable errors, dead-letter state in the ledger after
``max_attempts`` attempts of a stage. The ledger counts the attempts, Celery's own
retry limit is off. An assessment whose worker dies (SIGKILL, the OOM killer) counts
as a failed attempt: the next run finds the job still ``assessing`` and either tries
again or, after ``max_attempts``, dead-letters it with that reason.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import structlog
from celery import Celery, Task
from celery.exceptions import Retry
from pydicom import Dataset

from inference.batcher import SeriesBatcher
from inference.engine import Engine, EngineError, create_engine
from inference.prepare import PreparedSeries
from inference.result import AssessmentResult
from inference.vlm.policy import ExplainPolicy
from node.config import DestinationSettings, Settings
from node.ledger import JobInfo, JobState, Ledger, SeriesState
from node.metrics import metrics
from node.pipeline.app import IO, TASK_ASSESS, TASK_REPORT, queue_name
from node.pipeline.deliveries import deliver_one, seconds_until_due
from node.pipeline.payload import b64, decode_sources, job_key, unb64
from node.pipeline.reports import (
    SR,
    TEXT_SR,
    ReportSet,
    build_reports,
    content_time,
    decode_image,
    destinations_of,
    encode_image,
    keep_reports,
    load_kept,
    reports_root,
    wanted_companions,
    worst_image,
)
from node.pipeline.retry import plan_retry, retry_later
from node.redact import error_text
from sr_writer.uids import derive_uid

log = structlog.get_logger(__name__)

#: Errors that retrying cannot fix: bad input, a missing model, a permanent refusal.
NON_RETRYABLE: tuple[type[BaseException], ...] = (ValueError, EngineError, KeyError)
SKIP_STATES = (JobState.DONE, JobState.SUPERSEDED, JobState.DEAD)
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


_BATCHERS: dict[tuple[int, int, float], SeriesBatcher] = {}
_BATCHERS_LOCK = threading.Lock()  # also serialises building the engine


@lru_cache(maxsize=4)
def _ledger(url: str, pid: int) -> Ledger:
    """One ledger connection pool per worker process (``pid`` keys it across forks)."""
    return Ledger(url)


@lru_cache(maxsize=2)
def _engine(name: str, model: str | None, adapter: str | None, device: str,
            explain: ExplainPolicy, backend: str = "transformers",
            vllm_url: str | None = None, vllm_model: str | None = None) -> Engine:
    """The engine, built once per worker process on first use (the model loads lazily)."""
    from pathlib import Path

    return create_engine(name, model=Path(model) if model else None,
                         adapter=Path(adapter) if adapter else None, device=device,
                         explain=explain, backend=backend, vllm_url=vllm_url,
                         vllm_model=vllm_model)


def batcher_for(settings: Settings) -> SeriesBatcher:
    """This process's series batcher (``[engine] batch_series``), one per engine: the task
    threads of a gpu worker share it."""
    cfg = settings.engine
    engine = engine_for(settings)
    key = (id(engine), cfg.batch_series, cfg.batch_wait_seconds)
    with _BATCHERS_LOCK:
        if key not in _BATCHERS:
            _BATCHERS[key] = SeriesBatcher(engine, cfg.batch_series, cfg.batch_wait_seconds)
        return _BATCHERS[key]


def ledger_for(settings: Settings) -> Ledger:
    """This process's ledger."""
    return _ledger(settings.ledger_url, os.getpid())


def engine_for(settings: Settings) -> Engine:
    """This process's engine (one, also when a gpu worker's task threads ask at once)."""
    cfg = settings.engine
    with _BATCHERS_LOCK:
        return _engine(cfg.name, str(cfg.model) if cfg.model else None,
                       str(cfg.adapter) if cfg.adapter else None, cfg.device,
                       ExplainPolicy(cfg.explain, cfg.explain_below),
                       cfg.backend, cfg.vllm_url, cfg.vllm_model)


def assess(task: Task, settings: Settings, job_id: int, prepared_b64: str,
           sources: list[str]) -> None:
    """Assess one prepared series; record the result; enqueue the report."""
    ledger = ledger_for(settings)
    job = ledger.get_job(job_id)
    structlog.contextvars.bind_contextvars(series_uid=job.series_instance_uid, job_id=job_id)
    if job.state in SKIP_STATES:
        return
    if not job.result_json:
        died = _worker_died(job)
        if died is not None and job.attempts >= settings.delivery.max_attempts:
            error = f"{died}; gave up after {job.attempts} attempt(s)"
            ledger.dead_letter_job(job_id, error)
            log.error("job_dead_lettered", stage="assessment", attempts=job.attempts, error=error)
            return
        if died is not None:
            log.warning("assessment_worker_lost", attempt=job.attempts,
                        max_attempts=settings.delivery.max_attempts)
        job = ledger.move_job(job_id, JobState.ASSESSING, count_attempt=True, error=died)
        ledger.set_series_state(job.series_instance_uid, SeriesState.ASSESSING,
                                generation=job.generation)
        prepared = PreparedSeries.from_bytes(unb64(prepared_b64))
        try:
            engine = engine_for(settings)
            if engine.info.key != job.engine_key:
                raise EngineError(f"this worker's engine is {engine.info.key}, "
                                  f"the job was created for {job.engine_key}")
            started = time.perf_counter()
            result = batcher_for(settings).assess(prepared)
            seconds = time.perf_counter() - started
            metrics().assessments.labels(engine.info.name).observe(seconds)
        except NON_RETRYABLE as exc:
            ledger.dead_letter_job(job_id, f"assessment: {error_text(exc)}")
            return
        except Exception as exc:  # noqa: BLE001 - any other failure: retry, then dead-letter
            _retry_or_dead(task, settings, ledger, job, f"assessment: {error_text(exc)}")
            return
        job = ledger.move_job(job_id, JobState.REPORTING, result_json=result.to_json())
        ledger.set_series_state(job.series_instance_uid, SeriesState.REPORTING,
                                generation=job.generation)
        log.info("assessed", score=result.score, seconds=round(seconds, 3))
    else:
        prepared = PreparedSeries.from_bytes(unb64(prepared_b64))
    result = AssessmentResult.from_json(job.result_json or "")
    image = encode_image(worst_image(prepared, result)) \
        if "pdf" in wanted_companions(_destinations(settings, ledger, job)) else None
    task.app.send_task(TASK_REPORT, args=[job_id, sources, b64(image) if image else None],
                       queue=queue_name(settings, IO), argsrepr=f"(job {job_id})",
                       kwargsrepr="{}")


def _worker_died(job: JobInfo) -> str | None:
    """Why the job's previous assessment never finished, or None when it did not start.

    A job found ``assessing`` by a new run was left there by a run that neither
    recorded a result nor a failure: its worker process died (SIGKILL, the OOM killer,
    the node killed with its embedded workers). That attempt counts.
    """
    if job.state != JobState.ASSESSING:
        return None
    return (f"assessment: attempt {job.attempts} did not finish, its worker died "
            "(killed, e.g. SIGKILL or out of memory)")


def _retry_or_dead(task: Task, settings: Settings, ledger: Ledger, job: JobInfo,
                   error: str, *, count_attempt: bool = False) -> None:
    """Retry the job's stage after a backoff, or dead-letter it after ``max_attempts``.

    ``count_attempt`` counts this failure as an attempt of the job (stages that do not
    count their start, e.g. keeping the report files).
    """
    if count_attempt:
        job = ledger.move_job(job.id, JobState.FAILED, error=error, count_attempt=True)
    plan = plan_retry(job.attempts, settings.delivery)
    if plan is None:
        ledger.dead_letter_job(job.id, error)
        log.error("job_dead_lettered", attempts=job.attempts, error=error)
        return
    ledger.move_job(job.id, JobState.FAILED, error=f"{error}; {plan.describe()}")
    log.warning("job_retry", error=error, attempt=plan.attempt,
                max_attempts=plan.max_attempts, retry_in=round(plan.delay, 3))
    raise retry_later(task, plan.delay, job.id)


def _earlier_job(ledger: Ledger, job: JobInfo) -> JobInfo | None:
    """The job of the newest earlier generation that produced an SR (to supersede)."""
    earlier = ledger.previous_sr_uid(job.series_instance_uid, job.generation)
    if earlier is None:
        return None
    return next((old for old in ledger.jobs_of_series(job.series_instance_uid)
                 if old.sr_uid == earlier), None)


def _reference(old: JobInfo, sop_class_uid: str, role: str) -> Dataset:
    """A Predecessor Documents item for ``old``'s object of ``role`` (UIDs re-derived)."""
    key = job_key(old.series_instance_uid, old.generation, old.engine_key)
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = derive_uid(key, f"{role}-instance")
    ds.SeriesInstanceUID = derive_uid(key, f"{role}-series")
    return ds


def _predecessors(settings: Settings, old: JobInfo | None) -> dict[str, Dataset]:
    """What the new objects supersede, by kind: the earlier SR and Text SR.

    The earlier Text SR is referenced only when it was built, i.e. its file is kept
    beside the earlier SR under ``<home>/reports``.
    """
    if old is None or old.sr_uid is None:
        return {}
    sr = _reference(old, COMPREHENSIVE_3D_SR, "sr")
    sr.SOPInstanceUID = old.sr_uid
    found = {SR: sr}
    if old.report_path:
        text = _reference(old, BASIC_TEXT_SR, "text-sr")
        study_dir = reports_root(settings) / old.report_path.rpartition("/")[0]
        if (study_dir / f"{text.SOPInstanceUID}.dcm").is_file():
            found[TEXT_SR] = text
    return found


def _destinations(settings: Settings, ledger: Ledger,
                  job: JobInfo) -> tuple[DestinationSettings, ...]:
    return destinations_of(settings, ledger.series_info(job.series_instance_uid))


def _build(job: JobInfo, result: AssessmentResult, sources_b64: list[str],
           destinations: tuple[DestinationSettings, ...], image_b64: str | None,
           predecessors: dict[str, Dataset]) -> ReportSet:
    """The job's SR and companions, identical on every rebuild (see reports module)."""
    sources = decode_sources(sources_b64)
    if sources:
        for ref in predecessors.values():
            ref.StudyInstanceUID = sources[0].StudyInstanceUID
    return build_reports(
        sources, result, job_key=job_key(job.series_instance_uid, job.generation,
                                         job.engine_key),
        created=content_time(job.created_at), companions=wanted_companions(destinations),
        predecessor=predecessors.get(SR), text_predecessor=predecessors.get(TEXT_SR),
        image=decode_image(unb64(image_b64) if image_b64 else None))


def report(task: Task, settings: Settings, job_id: int, sources_b64: list[str],
           image_b64: str | None = None) -> None:
    """Build the job's SR (and companions); deliver to every destination of its rule."""
    ledger = ledger_for(settings)
    job = ledger.get_job(job_id)
    structlog.contextvars.bind_contextvars(series_uid=job.series_instance_uid, job_id=job_id)
    if job.state in SKIP_STATES or not job.result_json:
        return
    if ledger.series_info(job.series_instance_uid).generation != job.generation:
        ledger.move_job(job_id, JobState.SUPERSEDED)
        return
    wait = seconds_until_due(ledger, job)
    if wait is not None:
        log.info("delivery_not_due", retry_in=round(wait, 3))
        raise retry_later(task, wait, job_id)
    destinations = _destinations(settings, ledger, job)
    started = time.perf_counter()
    reports = load_kept(reports_root(settings), job_key(job.series_instance_uid, job.generation,
                                                        job.engine_key),
                        job.report_path, wanted_companions(destinations)) \
        if job.sr_uid and job.report_path else None
    if reports is not None:
        log.info("sr_reused", objects=len(reports.objects), report_path=job.report_path,
                 seconds=round(time.perf_counter() - started, 3))
        if job.state != JobState.DELIVERING:
            job = ledger.move_job(job_id, JobState.DELIVERING)
    else:
        built = _build_and_keep(task, settings, ledger, job, sources_b64, destinations,
                                image_b64)
        if built is None:
            return
        job, reports = built
    sr = reports.sr
    for dest in destinations:
        if not deliver_one(task, settings, ledger, job, dest, reports.for_destination(dest)):
            return
    _finish(ledger, job, str(sr.SOPInstanceUID), len(destinations))


def _build_and_keep(task: Task, settings: Settings, ledger: Ledger, job: JobInfo,
                    sources_b64: list[str], destinations: tuple[DestinationSettings, ...],
                    image_b64: str | None) -> tuple[JobInfo, ReportSet] | None:
    """Build the job's objects, keep them on disk, record the SR: the job moved to
    ``delivering`` and its objects; None when it was dead-lettered (retries raise)."""
    started = time.perf_counter()
    result = AssessmentResult.from_json(job.result_json or "")
    predecessors = _predecessors(settings, _earlier_job(ledger, job))
    try:
        reports = _build(job, result, sources_b64, destinations, image_b64, predecessors)
    except ValueError as exc:
        ledger.dead_letter_job(job.id, f"SR: {error_text(exc)}")
        return None
    try:
        kept = keep_reports(reports, reports_root(settings))
    except OSError as exc:
        _retry_or_dead(task, settings, ledger, job, f"report file: {error_text(exc)}",
                       count_attempt=True)
        return None
    log.info("sr_built", objects=len(reports.objects), report_path=kept[SR],
             seconds=round(time.perf_counter() - started, 3))
    superseded = predecessors.get(SR)
    job = ledger.move_job(job.id, JobState.DELIVERING, sr_uid=str(reports.sr.SOPInstanceUID),
                          report_path=kept[SR],
                          superseded_sr_uid=str(superseded.SOPInstanceUID)
                          if superseded is not None else None)
    return job, reports


def _finish(ledger: Ledger, job: JobInfo, sr_uid: str, destinations: int) -> None:
    """Record the job done and its series delivered (to zero destinations: kept only)."""
    ledger.move_job(job.id, JobState.DONE)
    ledger.set_series_state(job.series_instance_uid, SeriesState.DELIVERED,
                            generation=job.generation)
    ledger.add_series_event(job.series_instance_uid, "sr_sent", job_id=job.id, sr_uid=sr_uid,
                            detail=None if destinations else
                            f"no destinations; report kept at {job.report_path}")
    log.info("delivered", sr_uid=sr_uid, destinations=destinations,
             report_path=job.report_path)


@contextmanager
def _retry_unhandled(task: Task, settings: Settings, job_id: int,
                     stage: str) -> Iterator[None]:
    """Treat a failure the task did not handle like any other: retry, then dead-letter.

    Without this the job stayed in its stage and its series waited forever (e.g. after
    a ledger error); now it is retried after the policy's backoff and, after
    ``max_attempts``, dead-lettered where ``qcnode status`` shows it and ``qcnode
    retry`` re-queues it. An assessment counted its start already; other stages count
    the failure. Celery's retries (:class:`~celery.exceptions.Retry`) pass through.
    """
    try:
        yield
    except Retry:
        raise
    except Exception as exc:
        error = f"{stage}: unexpected {error_text(exc)}"
        log.error("task_failed", stage=stage, error=error)
        try:
            ledger = ledger_for(settings)
            job = ledger.get_job(job_id)
            if job.state not in SKIP_STATES:
                _retry_or_dead(task, settings, ledger, job, error,
                               count_attempt=job.state != JobState.ASSESSING)
        except Retry:
            raise
        except Exception as inner:  # noqa: BLE001 - the ledger itself failed: logged
            log.error("task_failure_not_recorded", error=type(inner).__name__)
        raise


def register(app: Celery, settings: Settings) -> None:
    """Register the tasks on ``app``, bound to ``settings``.

    ``max_retries=None``: Celery never gives up on its own (it would after 3 retries);
    the ledger counts attempts against ``[delivery] max_attempts``
    (:mod:`node.pipeline.retry`).
    """

    @app.task(name=TASK_ASSESS, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def _assess(self: Task, job_id: int, prepared_b64: str, sources: list[str]) -> None:
        with _retry_unhandled(self, settings, job_id, "assessment"):
            assess(self, settings, job_id, prepared_b64, sources)

    @app.task(name=TASK_REPORT, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def _report(self: Task, job_id: int, sources: list[str],
                image: str | None = None) -> None:
        with _retry_unhandled(self, settings, job_id, "report"):
            report(self, settings, job_id, sources, image)
