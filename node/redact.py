"""What a log line may say about an error or a library's record: never data set contents.

An exception's message may quote what it failed on: pydicom and highdicom quote
attribute values, Celery's ``MaxRetriesExceededError`` quotes a task's arguments (the
series' headers, base64), SQLAlchemy quotes statement parameters. So a log line, the
ledger's ``last_error`` and ``journal/state.json`` name an exception by its class and
the place it was raised (``where``); the UIDs bound to the log context say what it
was about. :data:`TRUSTED_MESSAGES` are the exceptions whose message this code writes
itself from settings, numbers and UIDs.

Records of other libraries (Celery, kombu, pynetdicom, warnings) are re-rendered from
their format string with each argument reduced to what cannot carry data set
contents (:func:`safe_arg`), and no rendered line exceeds :data:`MAX_LINE_CHARS`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any

from inference.errors import EngineError
from node.receive.dimse import CommandError
from node.receive.upperlayer import ProtocolError

#: The longest log line written (characters, without the newline).
MAX_LINE_CHARS = 4096
#: A value longer than this is cut when a line is over :data:`MAX_LINE_CHARS`.
MAX_VALUE_CHARS = 512
#: A library's string argument longer than this is replaced by its length.
MAX_ARG_CHARS = 200
#: Frames of a traceback shown (the innermost ones).
MAX_FRAMES = 12
#: Exceptions whose messages are written by this code from settings, numbers and UIDs
#: (an engine that cannot be built; a PDU or command set that does not parse).
TRUSTED_MESSAGES: tuple[type[BaseException], ...] = (EngineError, ProtocolError, CommandError)
#: Keys of Celery's task log context that hold task arguments, results or tracebacks.
CELERY_DATA_KEYS = frozenset({"args", "kwargs", "argsrepr", "kwargsrepr", "return_value",
                              "traceback", "retval"})
#: A UID: an ISO OID (first arc 0, 1 or 2) of four or more arcs (PS3.5 §9.1).
_UID = re.compile(r"(?<![\w.])[012](?:\.[0-9]{1,39}){3,63}(?!\.?\w)")
_REPR_CLASS = re.compile(r"^([A-Za-z_][\w.]*)\(")
_WARNING = re.compile(r"^(?P<where>.*?:\d+): (?P<category>\w+): ", re.DOTALL)


def where(exc: BaseException) -> str:
    """``dir/file.py:line`` of the innermost frame of ``exc``'s traceback, or ``?``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return _frame(tb) if tb is not None else "?"


def _frame(tb: TracebackType) -> str:
    path = tb.tb_frame.f_code.co_filename.replace("\\", "/").split("/")
    return f"{'/'.join(path[-2:])}:{tb.tb_lineno}"


def message_uid(exc: BaseException) -> str | None:
    """The first UID the exception's message names (PS3.5 §9: digits and dots), if any.

    A UID says which instance or series failed without quoting anything else.
    """
    match = _UID.search(str(exc))
    return match.group(0) if match else None


def error_fields(exc: BaseException) -> dict[str, str]:
    """Log fields for ``exc``: its class, where it was raised and the UID its message
    names, never the message itself."""
    fields = {"error": type(exc).__name__, "where": where(exc)}
    uid = message_uid(exc)
    if uid is not None:
        fields["error_uid"] = uid
    return fields


def error_text(exc: BaseException) -> str:
    """One line for the ledger or a state file: the class, where it was raised, the UID
    its message names; an OS error's reason (``strerror``, never the file name); the
    message itself only for :data:`TRUSTED_MESSAGES`."""
    if isinstance(exc, TRUSTED_MESSAGES):
        return f"{type(exc).__name__}: {exc}"[:MAX_VALUE_CHARS]
    text = f"{type(exc).__name__} at {where(exc)}"
    if isinstance(exc, OSError) and exc.strerror:
        text += f": {exc.strerror}"
    uid = message_uid(exc)
    return f"{text} ({uid})" if uid is not None else text


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (``raise … from``, or raised while handling)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in chain) and len(chain) < 5:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _frames(exc: BaseException) -> str:
    """The innermost :data:`MAX_FRAMES` frames: ``file:line function`` (outermost first)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(f"{_frame(tb)} {tb.tb_frame.f_code.co_name}")
        tb = tb.tb_next
    return " > ".join(frames[-MAX_FRAMES:])


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1] if isinstance(exc_info[1], BaseException) else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def render_exc_info(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace ``exc_info`` by the exception's classes and frames, and an exception
    passed as a value by its class (structlog processor).

    Stands where :func:`structlog.processors.format_exc_info` would: a traceback's last
    line is the exception's message, and that is what must not be written.
    """
    exc = _exception(event_dict.pop("exc_info", None))
    event_dict.pop("stack_info", None)
    for key, value in event_dict.items():
        if isinstance(value, BaseException):  # log.error("…", error=exc)
            event_dict[key] = type(value).__name__
    if exc is not None:
        chain = _chain(exc)
        event_dict["exception"] = " <- ".join(type(e).__name__ for e in chain)
        event_dict["traceback"] = " <- ".join(f"{type(e).__name__}: {_frames(e)}"
                                              for e in chain)
    return event_dict


class _Shown(str):
    """A placeholder that ``%r`` shows as it is (a class name, ``<dict>``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def safe_arg(value: Any, key: str | None = None) -> Any:
    """A library's log argument as it may be written (see the module docstring)."""
    if key in CELERY_DATA_KEYS:
        return _Shown("…")
    if isinstance(value, BaseException):
        return _Shown(type(value).__name__)
    if key == "exc" and isinstance(value, str):
        return _Shown(_exception_class(value))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_ARG_CHARS else _Shown(f"<{len(value)} characters>")
    return _Shown(f"<{type(value).__name__}>")


def _exception_class(text: str) -> str:
    """The class named by Celery's ``safe_repr(exc)`` (``Name(…)``), or the words before
    a colon (``Retry in 2s: …`` from ``str(Retry)``)."""
    match = _REPR_CLASS.match(text)
    if match:
        return match.group(1)
    head = text.partition(":")[0]
    return head if len(head) <= MAX_ARG_CHARS else f"<{len(head)} characters>"


def _render(record: logging.LogRecord, args: Any) -> str:
    if isinstance(args, Mapping):
        safe: Any = {k: safe_arg(v, str(k)) for k, v in args.items()}
    else:
        safe = tuple(safe_arg(v) for v in (args or ()))
    try:
        return str(record.msg) % safe if safe else str(record.msg)
    except (TypeError, ValueError, KeyError):
        return str(record.msg)


def redact_foreign(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Re-render a stdlib record of another library (ProcessorFormatter pre-chain).

    Needs ``pass_foreign_args=True``. Python warnings (``py.warnings``) keep only their
    category and place: pydicom's quote the value they warn about.
    """
    record = event_dict.get("_record")
    if not isinstance(record, logging.LogRecord):
        return event_dict
    args = event_dict.pop("positional_args", ())
    if len(args) == 1 and isinstance(args[0], Mapping):
        args = args[0]
    event_dict["logger"] = record.name
    if record.name == "py.warnings":
        match = _WARNING.match(str(record.msg))  # the formatted warning is the message
        event_dict["event"] = "warning"
        event_dict["category"] = match.group("category") if match else "?"
        event_dict["where"] = "/".join(match.group("where").split("/")[-2:]) if match else "?"
        return event_dict
    if isinstance(record.msg, BaseException):  # pynetdicom: LOGGER.exception(exc)
        event_dict["event"] = type(record.msg).__name__
        return event_dict
    event_dict["event"] = _render(record, args)
    return event_dict


def _cut(value: Any) -> Any:
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= MAX_VALUE_CHARS:
        return value
    return f"{text[:MAX_VALUE_CHARS]}…(+{len(text) - MAX_VALUE_CHARS})"


def capped(renderer: Callable[[Any, str, Any], Any]) -> Callable[[Any, str, Any], Any]:
    """Wrap a structlog renderer so that no line exceeds :data:`MAX_LINE_CHARS`.

    An over-long line is rendered again with every value cut to
    :data:`MAX_VALUE_CHARS`; if still too long, with only its event, level and time.
    """
    def render(logger: Any, method: str, event_dict: Any) -> Any:
        line = renderer(logger, method, dict(event_dict))
        if not isinstance(line, str) or len(line) <= MAX_LINE_CHARS:
            return line
        cut = {k: _cut(v) for k, v in event_dict.items()}
        cut["line_cut_from"] = len(line)
        shorter = renderer(logger, method, dict(cut))
        if isinstance(shorter, str) and len(shorter) <= MAX_LINE_CHARS:
            return shorter
        core: dict[str, Any] = {k: str(event_dict[k])[:MAX_VALUE_CHARS] for k in
                                ("event", "level", "timestamp", "logger") if k in event_dict}
        core["line_cut_from"] = len(line)
        return renderer(logger, method, core)

    return render
