"""Delivering a job's reports to one destination, one attempt at a time.

An attempt that fails transiently is retried after the policy's backoff
(:mod:`node.pipeline.retry`), recorded on the delivery row as ``failed`` with its
``next_attempt_at`` (``qcnode status``: "attempt n of N failed, next at T"); the
attempt ``max_attempts`` — or a permanent failure — dead-letters the delivery and its
job, the series goes ``failed`` and ``qcnode retry`` re-queues it.
"""

from __future__ import annotations

import time

import structlog
from celery import Task
from pydicom import Dataset

from node import audit_log
from node.config import DestinationSettings, Settings
from node.ledger import ConfirmedBy, DeliveryInfo, DeliveryState, JobInfo, JobState, Ledger
from node.metrics import metrics
from node.pipeline.retry import RetryPlan, plan_retry, retry_later, seconds_until
from node.send.scu import DeliveryError, Failure, Reason, deliver

log = structlog.get_logger(__name__)


def deliver_one(task: Task, settings: Settings, ledger: Ledger, job: JobInfo,
                dest: DestinationSettings, datasets: list[Dataset]) -> bool:
    """Deliver to one destination; False when the job was dead-lettered."""
    delivery = ledger.create_delivery(job.id, dest.name)
    if delivery.state == DeliveryState.CONFIRMED:
        return True
    if delivery.state == DeliveryState.DEAD:
        return False
    started = time.perf_counter()
    try:
        receipt = deliver(datasets, dest, node_ae=settings.node.ae_title,
                          bind_host=settings.node.host, node_port=settings.node.port,
                          ledger=ledger)
    except DeliveryError as exc:
        metrics().delivery_failures.labels(dest.name).inc()
        return delivery_failed(task, settings, ledger, job, delivery, exc.failure)
    except Exception as exc:  # noqa: BLE001 - unforeseen: retried like a transient failure
        metrics().delivery_failures.labels(dest.name).inc()
        failure = Failure(Reason.INTERNAL, type(exc).__name__)
        return delivery_failed(task, settings, ledger, job, delivery, failure)
    metrics().deliveries.labels(dest.name).observe(time.perf_counter() - started)
    log.info("sent", destination=dest.name, confirmed_by=receipt.confirmation,
             seconds=round(receipt.seconds, 3), attempt=delivery.attempts + 1)
    ledger.move_delivery(delivery.id, DeliveryState.SENT, count_attempt=True)
    ledger.move_delivery(delivery.id, DeliveryState.CONFIRMED,
                         confirmed_by=ConfirmedBy(receipt.confirmation))
    audit_log.report_delivered(dest, dest.calling_ae_title or settings.node.ae_title,
                               [(str(d.StudyInstanceUID), str(d.SOPClassUID)) for d in datasets])
    return True


def delivery_failed(task: Task, settings: Settings, ledger: Ledger, job: JobInfo,
                    delivery: DeliveryInfo, failure: Failure) -> bool:
    """Record a failed attempt; retry it after a backoff (raises) or dead-letter (False)."""
    attempt = delivery.attempts + 1
    error = f"{delivery.destination}: {failure}"
    plan: RetryPlan | None = plan_retry(attempt, settings.delivery) \
        if failure.transient else None
    log.warning("delivery_failed", destination=delivery.destination, error=error,
                attempt=attempt, max_attempts=settings.delivery.max_attempts,
                transient=failure.transient,
                retry_in=round(plan.delay, 3) if plan is not None else None,
                next_attempt_at=plan.next_at.isoformat() if plan is not None else None)
    if plan is not None:
        ledger.move_delivery(delivery.id, DeliveryState.FAILED, error=error,
                             count_attempt=True, next_attempt_at=plan.next_at)
        ledger.move_job(job.id, JobState.DELIVERING, error=f"{error}; {plan.describe()}")
        raise retry_later(task, plan.delay, job.id)
    ledger.move_delivery(delivery.id, DeliveryState.DEAD, error=error, count_attempt=True)
    if failure.transient:
        error = f"{error}; gave up after {attempt} attempt(s)"
    ledger.dead_letter_job(job.id, error)
    log.error("job_dead_lettered", destination=delivery.destination, attempts=attempt,
              error=error)
    return False


def seconds_until_due(ledger: Ledger, job: JobInfo) -> float | None:
    """Seconds until the job's earliest waiting delivery retry, None when one is due."""
    planned = [d.next_attempt_at for d in ledger.deliveries_of(job.id)
               if d.state == DeliveryState.FAILED and d.next_attempt_at is not None]
    return seconds_until(min(planned)) if planned else None
