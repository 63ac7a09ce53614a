"""The one retry policy of the pipeline's tasks (``[delivery]`` settings).

The ledger counts attempts and decides; Celery only carries the delay. A stage (an
assessment, the delivery to one destination) is tried at most ``max_attempts`` times:
after a transient failure of attempt *n* < ``max_attempts`` the task is re-sent with a
countdown of :func:`backoff` (*n*) seconds; after attempt ``max_attempts`` (or a
permanent failure) the job is dead-lettered, its series ``failed``, and ``qcnode
retry`` re-queues it.

Celery's own retry limit is switched off for these tasks (``max_retries=None`` on the
task, see :func:`node.pipeline.tasks.register`). With the limit on, ``task.retry`` gave
up after Celery's default of 3 retries whatever ``max_attempts`` said, raising
``MaxRetriesExceededError`` — whose message holds the task's arguments (hundreds of KB
of encoded DICOM headers) — and leaving the job in a non-final state nobody re-queued.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from celery import Task
from celery.exceptions import Retry

from node.config import DeliverySettings

#: A run this close to its planned time is not early (timers, clocks of two hosts).
EARLY_TOLERANCE = 0.25


def backoff_base(attempt: int, policy: DeliverySettings) -> float:
    """The un-jittered delay after attempt ``attempt``: initial × 2^(attempt−1), capped."""
    return float(min(policy.backoff_max_seconds,
                     policy.backoff_initial_seconds * 2 ** max(0, attempt - 1)))


def backoff(attempt: int, policy: DeliverySettings) -> float:
    """Seconds before attempt ``attempt + 1``: :func:`backoff_base` × a jitter in [½, 1]."""
    return backoff_base(attempt, policy) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class RetryPlan:
    """When a failed attempt is tried again."""

    attempt: int
    max_attempts: int
    delay: float
    next_at: dt.datetime

    def describe(self) -> str:
        """``attempt n of N, next at T`` (for logs and the ledger)."""
        return (f"attempt {self.attempt} of {self.max_attempts}, "
                f"next at {self.next_at.isoformat(timespec='seconds')}")


def plan_retry(attempt: int, policy: DeliverySettings,
               now: dt.datetime | None = None) -> RetryPlan | None:
    """The retry after failed attempt ``attempt`` (1-based), or None: dead-letter it."""
    if attempt >= policy.max_attempts:
        return None
    delay = backoff(attempt, policy)
    start = now if now is not None else dt.datetime.now(dt.UTC)
    return RetryPlan(attempt, policy.max_attempts, delay, start + dt.timedelta(seconds=delay))


def retry_later(task: Task, delay: float, job_id: int) -> Retry:
    """Re-send the running task after ``delay`` seconds (raise what this returns).

    ``argsrepr`` keeps the task's arguments (encoded DICOM headers, slices) out of
    anything Celery shows or logs about the new message.
    """
    retry: Retry = task.retry(countdown=delay, argsrepr=f"(job {job_id})", kwargsrepr="{}")
    return retry


def seconds_until(due: dt.datetime | None, now: dt.datetime | None = None) -> float | None:
    """Seconds until ``due`` when it is more than :data:`EARLY_TOLERANCE` away, else None.

    A report task re-dispatched while its delivery waits for a retry (the node or the
    io worker restarted, the delayed message was lost with it) waits for the planned
    time instead of trying at once: the backoff holds across restarts.
    """
    if due is None:
        return None
    left = (due - (now if now is not None else dt.datetime.now(dt.UTC))).total_seconds()
    return left if left > EARLY_TOLERANCE else None
