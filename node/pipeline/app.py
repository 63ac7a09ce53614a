"""The Celery application, built from :class:`~node.config.Settings`.

Two declared queues: ``gpu`` (assessment; prefetch 1, long tasks) and ``io`` (SR build
and delivery). Nothing else is created on the broker (``task_create_missing_queues``
off); messages are acknowledged only after the task ran (``acks_late``) and go back to
the queue when a worker process dies mid-task (``reject_on_worker_lost``).

Without ``[broker] url`` the broker is a SQLite file in the node's home
(``sqlite:///<home>/broker.sqlite3`` with :mod:`node.pipeline.sqlite_broker`, kombu's
SQLAlchemy transport tuned for latency): nothing to install or start.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery
from kombu.entity import Exchange, Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.transport import virtual

from node.config import Settings
from node.pipeline.sqlite_broker import TRANSPORT_PATH

APP_NAME = "qcnode"
TASK_ASSESS = "qcnode.assess"
TASK_REPORT = "qcnode.report"
GPU = "gpu"
IO = "io"
#: The embedded broker's SQLite file in the node's home.
BROKER_FILE = "broker.sqlite3"

log = structlog.get_logger(__name__)


def broker_url(settings: Settings) -> str:
    """The configured broker, or the embedded SQLite-backed one in ``<home>``."""
    if settings.broker.url:
        return settings.broker.url
    return f"sqlite:///{(settings.node.home / BROKER_FILE).resolve()}"


def embedded(settings: Settings) -> bool:
    """True when the node runs its own broker and workers (no ``[broker] url``)."""
    return not settings.broker.url


def queue_name(settings: Settings, stage: str) -> str:
    """The broker-side name of a stage's queue (``queue_prefix`` + ``gpu``/``io``)."""
    return f"{settings.broker.queue_prefix}{stage}"


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (tasks are registered by :mod:`node.pipeline.tasks`)."""
    gpu, io = queue_name(settings, GPU), queue_name(settings, IO)
    exchange = Exchange(f"{settings.broker.queue_prefix}qcnode", type="direct")  # type: ignore[no-untyped-call]
    app = Celery(APP_NAME, broker=broker_url(settings), set_as_current=False)
    transport: dict[str, Any] = {}
    app.conf.update(
        task_queues=(
            Queue(gpu, exchange, routing_key=gpu),  # type: ignore[no-untyped-call]
            Queue(io, exchange, routing_key=io),  # type: ignore[no-untyped-call]
        ),
        task_default_queue=io,
        task_default_exchange=exchange.name,
        task_default_routing_key=io,
        task_routes={TASK_ASSESS: {"queue": gpu, "routing_key": gpu},
                     TASK_REPORT: {"queue": io, "routing_key": io}},
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_backend=settings.broker.result_backend,
        task_ignore_result=True,
        broker_transport=TRANSPORT_PATH if embedded(settings) else None,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def missing_broker(settings: Settings) -> str | None:
    """Why the queues cannot be asked without side effects, or None when they can.

    The embedded broker is a SQLite file that connecting would create: when it does
    not exist yet (the node never ran in this home), nothing is queued anywhere.
    """
    if not embedded(settings):
        return None
    path = settings.node.home / BROKER_FILE
    if path.exists():
        return None
    return f"embedded broker {path} does not exist (qcnode serve has not run in this home)"


def queue_depths(settings: Settings, timeout: float = 5.0) -> dict[str, int | None]:
    """Messages waiting in each stage's queue (``gpu``, ``io``); None where unknown.

    Counts messages not yet handed to a worker (RabbitMQ's ``message_count``, the
    Redis list length, the SQLite rows); tasks being executed are not included. An
    unreachable broker gives None for every queue rather than an error.
    """
    depths: dict[str, int | None] = {GPU: None, IO: None}
    with create_app(settings).connection_for_read(connect_timeout=timeout) as conn:
        unreachable = (*conn.connection_errors, KombuOperationalError, OSError)
        # A virtual transport (SQLite, Redis) has no queue object: missing means empty.
        missing = 0 if isinstance(conn.transport, virtual.Transport) else None
        try:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            channel = conn.default_channel
            for stage in depths:
                try:
                    ok = channel.queue_declare(queue=queue_name(settings, stage), passive=True)
                    depths[stage] = int(ok.message_count)
                except conn.channel_errors:
                    depths[stage] = missing
                    channel = conn.channel()  # AMQP closes the channel after a 404
        except unreachable as exc:
            log.warning("broker_unreachable", error=type(exc).__name__)
    return depths
