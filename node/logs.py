"""Logging: structlog, JSON when stderr is not a terminal, pretty on a TTY.

Context (``calling_ae``, ``assoc_id``, ``series_uid``, ``task_id``) is bound through
:mod:`structlog.contextvars`. Never log a dataset or a patient attribute: identifiers
are UIDs only. :func:`scrub_event` drops any key that names a patient attribute, as a
last line of defence; exceptions are written as their class and frames, never their
message, other libraries' records with their arguments reduced, and no line is longer
than :data:`~node.redact.MAX_LINE_CHARS` (:mod:`node.redact`). Celery's loggers go
through the same handler (:func:`celery_logging`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from node.redact import MAX_LINE_CHARS, capped, redact_foreign, render_exc_info

__all__ = ["MAX_LINE_CHARS", "configure_logging", "get_logger", "scrub_event"]

#: Keys that must never reach a log line, whatever a caller binds.
FORBIDDEN_KEYS = frozenset(
    {
        "patient_name", "patientname", "patient_id", "patientid", "patient_birth_date",
        "patientbirthdate", "patient_sex", "accession_number", "accessionnumber",
        "referring_physician", "institution_name", "dataset", "ds",
    }
)


def scrub_event(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop keys that could carry patient data (structlog processor)."""
    for key in [k for k in event_dict if k.lower() in FORBIDDEN_KEYS]:
        del event_dict[key]
    return event_dict


def configure_logging(
    level: str = "INFO", json_output: Literal["auto", "always", "never"] = "auto"
) -> None:
    """Configure structlog and the stdlib root logger once, at the entry point."""
    use_json = json_output == "always" or (json_output == "auto" and not sys.stderr.isatty())
    renderer: Any = capped(
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_event,
        render_exc_info,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # One write per line: print() writes the newline on its own, and a flush by the
        # stdlib handler's thread in between sent lines without it, so the workers'
        # lines (same stderr) landed inside the node's (tests/test_logs.py).
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (pynetdicom, celery, sqlalchemy) log through stdlib: keep them quiet
    # and in one format. pynetdicom logs dataset contents at DEBUG: never enable that.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[redact_foreign, *shared],
            pass_foreign_args=True,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings through the same handler (py.warnings)


def celery_logging(level: str) -> None:
    """Keep Celery from setting up logging of its own in a worker; use ours.

    Connected to Celery's ``setup_logging`` signal (a receiver makes Celery leave
    logging alone: no handler of its own on ``celery.task``, no plain-text format, the
    root logger's level untouched). Celery's records then go through the root handler
    of :func:`configure_logging` at ``level``, its task log lines without the task's
    arguments or the exception's message (:func:`node.redact.redact_foreign`).
    """
    from celery import signals

    def _setup(**_kwargs: Any) -> None:
        logging.getLogger("celery").setLevel(logging.getLevelName(level))

    signals.setup_logging.connect(_setup, weak=False)


def get_logger(name: str) -> Any:
    """A structlog logger named ``name``."""
    return structlog.get_logger(name)
