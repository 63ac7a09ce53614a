"""node.logs / node.redact: what a log line may hold, in a process configured like the node.

Each case runs a short script in a fresh interpreter (logging is configured once per
process, at its entry point) and reads the JSON lines it writes to stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from inference.errors import EngineError
from node.redact import MAX_LINE_CHARS, error_fields, error_text

SECRET = "Xqzsecretfam^Wvksecretgiv"
PRELUDE = f"""
import logging, warnings
from node.logs import configure_logging, get_logger
configure_logging("DEBUG", "always")
log = get_logger("t")
SECRET = {SECRET!r}
"""


def run(body: str) -> tuple[str, list[dict[str, Any]]]:
    """stderr of ``PRELUDE + body`` and its JSON lines."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr, [json.loads(line) for line in done.stderr.splitlines()]


def test_exception_logged_by_class_and_frames_never_its_message() -> None:
    text, (event,) = run("""
def parse():
    raise ValueError(f"invalid value for VR PN: {SECRET!r}")
try:
    try:
        parse()
    except ValueError as exc:
        raise RuntimeError(f"SR: {exc}") from exc
except RuntimeError:
    log.exception("report failed")
""")
    assert SECRET not in text and "Xqzsecretfam" not in text
    assert event["event"] == "report failed"
    assert event["exception"] == "RuntimeError <- ValueError"
    assert "parse" in event["traceback"] and "<string>:" in event["traceback"]


def test_celery_task_failure_line_without_arguments_or_message() -> None:
    """Celery's own trace record (its template, its context) as a worker logs it."""
    text, (event,) = run("""
from celery.app.trace import LOG_FAILURE
from celery.exceptions import MaxRetriesExceededError
args = (7, ["QUFB" + SECRET])
exc = MaxRetriesExceededError(f"Can't retry qcnode.report[abc] args:{args} kwargs:{{}}")
try:
    raise exc
except MaxRetriesExceededError:
    import sys
    info = sys.exc_info()
context = {"hostname": "h", "id": "abc", "name": "qcnode.report", "exc": repr(exc),
           "traceback": "Traceback ... " + SECRET, "args": repr(args), "kwargs": "{}",
           "description": "raised unexpected", "internal": False}
logging.getLogger("celery.app.trace").log(logging.ERROR, LOG_FAILURE.strip(), context,
                                          exc_info=info, extra={"data": context})
""")
    assert "Xqzsecretfam" not in text and "args:" not in text
    assert event["event"] == ("Task qcnode.report[abc] raised unexpected: "
                              "MaxRetriesExceededError")
    assert event["logger"] == "celery.app.trace"
    assert event["exception"] == "MaxRetriesExceededError"


def test_library_arguments_reduced_and_warnings_to_their_category() -> None:
    text, events = run("""
logging.getLogger("celery.pool").error("TaskPool: Apply %s (args:%s kwargs:%s)",
                                       "fn", ("qcnode.report", [SECRET]), {})
logging.getLogger("kombu").error("Task handler raised error: %r", KeyError(SECRET))
logging.getLogger("pynetdicom.acse").error(ValueError(SECRET))
warnings.warn(f"Invalid value for VR PN: {SECRET!r}", UserWarning, stacklevel=1)
""")
    assert "Xqzsecretfam" not in text
    assert [e["event"] for e in events] == [
        "TaskPool: Apply fn (args:<tuple> kwargs:<dict>)",
        "Task handler raised error: KeyError", "ValueError", "warning"]
    assert events[3]["category"] == "UserWarning" and events[3]["logger"] == "py.warnings"


def test_no_line_longer_than_the_cap() -> None:
    text, events = run("""
log.info("big", payload="A" * 300_000, other=list(range(20_000)))
logging.getLogger("sqlalchemy").warning("x" * 100_000)
log.info("small", n=1)
""")
    assert all(len(line) <= MAX_LINE_CHARS for line in text.splitlines())
    big, foreign, small = events
    assert big["event"] == "big" and big["line_cut_from"] > 300_000
    assert foreign["line_cut_from"] > 100_000
    assert small == {**small, "event": "small", "n": 1} and "line_cut_from" not in small


def test_exception_as_a_value_is_its_class() -> None:
    text, (event,) = run("""
log.error("failed", error=KeyError(SECRET), count=2)
""")
    assert "Xqzsecretfam" not in text and event["error"] == "KeyError"


def test_error_fields_and_text_name_the_class_and_uid_not_the_message() -> None:
    try:
        raise ValueError(f"instance 1.2.826.0.1.3680043.8.498.1234: PN {SECRET!r}, 1.25")
    except ValueError as exc:
        fields, text = error_fields(exc), error_text(exc)
    assert fields["error"] == "ValueError" and fields["where"].startswith("tests/test_logs.py:")
    assert fields["error_uid"] == "1.2.826.0.1.3680043.8.498.1234"
    assert text.startswith("ValueError at tests/test_logs.py:") and SECRET not in text
    assert text.endswith(" (1.2.826.0.1.3680043.8.498.1234)")
    try:
        Path(f"/nonexistent/{SECRET}").read_bytes()
    except OSError as exc:
        text = error_text(exc)
    assert text.startswith("FileNotFoundError at ") and text.endswith(": No such file or directory")
    assert error_text(EngineError("unknown engine 'x'")) == "EngineError: unknown engine 'x'"


def test_lines_stay_whole_with_threads_and_processes_on_one_file(tmp_path: Path) -> None:
    """The node's workers share its stderr; its own threads log through structlog and
    through the stdlib handler at once. Every line must still be one JSON object."""
    script = PRELUDE + """
import threading
def ours():
    for i in range(4000):
        log.info("ours", i=i, pad="x" * 200)
def theirs():
    for i in range(4000):
        logging.getLogger("celery").warning("theirs %s %s", i, "y" * 150)
threads = [threading.Thread(target=ours), threading.Thread(target=theirs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""
    out = tmp_path / "shared.log"
    with out.open("ab") as shared:
        procs = [subprocess.Popen([sys.executable, "-c", script], stderr=shared)
                 for _ in range(2)]
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 16_000
    broken = [line[:120] for line in lines if not _parses(line)]
    assert not broken, f"{len(broken)} broken lines, e.g. {broken[:3]}"


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
