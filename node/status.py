"""``qcnode status [--json]``: what the ledger knows, for admins and scripts.

Series (Series Instance UID, state, instance count, closing trigger), counts by state,
the oldest series still waiting in a non-final state, and failed or dead-lettered jobs
and deliveries with their last error. ``--json`` prints one JSON object (keys below)
for scripts; without it, a short text summary. Output holds UIDs and series
descriptions, no patient attributes.

The node is found like ``qcnode serve`` finds it (``--config``, ``$QCNODE_CONFIG``,
``./qcnode.toml``, ``/etc/qcnode/qcnode.toml``); when its home does not exist, status
says so and exits 1 rather than creating an empty one. A closed pipe (``| head``) ends
the output quietly.

JSON keys: ``journal`` (images acknowledged but not yet in the spool and the ledger:
``waiting``, ``oldest_waiting_seconds``, ``failing`` and ``last_error`` when the spool or
the ledger refuses them, ``updated_at``; null when the node never ran), ``counts``
{state: n}, ``oldest_waiting`` (object or null), ``series``
[objects, most recently changed first, at most ``--limit``; each with its
``description`` (Series Description), ``series_number`` (from a spool file's header;
null when the spool is not reachable), the current job's ``score`` and ``score_label``
(null until assessed), ``sr_uid``, ``report_path`` (the SR kept under ``<home>/reports``),
``destinations`` (deliveries made) and a ``note``, e.g. "no destinations; report kept
at ..."], ``failures`` [objects; a delivery waiting for its next attempt has
``next_attempt_at``, shown as "attempt n of N failed, next at T"], ``queues``
{``gpu``/``io``: messages waiting, null if the broker cannot be asked} and
``queues_note`` (why they are null, else null). Status never creates the embedded
broker's file: without it the depths are null.

``qcnode retry SERIES|--failed`` re-queues dead-lettered work (see :func:`retry_main`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from inference.result import score_label
from node.config import CONFIG_ENV, ConfigError, Settings, load_settings, resolve_config_path
from node.ledger import FailureInfo, JobState, Ledger, SeriesInfo, SeriesState
from node.store.ingest import STATE_FILE

EXIT_OK = 0
EXIT_FAILURE = 1
#: Series Number (0020,0011), PS3.3 C.7.3.1.
SERIES_NUMBER = "SeriesNumber"
DEFAULT_LIMIT = 200
#: States in which a series still waits for the node to do something.
WAITING_STATES = (
    SeriesState.RECEIVING, SeriesState.COMPLETE, SeriesState.QUEUED,
    SeriesState.ASSESSING, SeriesState.REPORTING,
)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def report_entry(ledger: Ledger, info: SeriesInfo, reports: Path) -> dict[str, Any]:
    """The series' current job's SR: UID, kept file, deliveries, and a note for admins."""
    jobs = [j for j in ledger.jobs_of_series(info.series_instance_uid)
            if j.generation == info.generation]
    job = jobs[-1] if jobs else None
    entry: dict[str, Any] = {"sr_uid": None, "report_path": None, "destinations": None,
                             "note": None}
    if job is None or job.report_path is None:
        return entry
    path = str(reports / job.report_path)
    entry.update(sr_uid=job.sr_uid, report_path=path)
    if job.state == JobState.DONE:
        sent = len(ledger.deliveries_of(job.id))
        entry["destinations"] = sent
        if sent == 0:
            entry["note"] = f"no destinations; report kept at {path}"
    return entry


def series_entry(info: SeriesInfo) -> dict[str, Any]:
    """One series as a JSON-ready dict."""
    return {
        "series_instance_uid": info.series_instance_uid,
        "study_instance_uid": info.study_instance_uid,
        "modality": info.modality,
        "description": info.description,
        "rule": info.rule,
        "state": info.state.value,
        "instance_count": info.instance_count,
        "trigger": info.close_trigger,
        "generation": info.generation,
        "reopen_count": info.reopen_count,
        "first_instance_at": _iso(info.first_instance_at),
        "last_instance_at": _iso(info.last_instance_at),
        "closed_at": _iso(info.closed_at),
        "state_changed_at": _iso(info.state_changed_at),
        "last_error": info.last_error,
    }


def failure_entry(failure: FailureInfo, max_attempts: int | None = None) -> dict[str, Any]:
    """One failed job or delivery as a JSON-ready dict.

    A delivery waiting for its next attempt has ``next_attempt_at``; ``max_attempts``
    is the configured limit (None when unknown).
    """
    entry = asdict(failure)
    entry["updated_at"] = _iso(failure.updated_at)
    entry["next_attempt_at"] = _iso(failure.next_attempt_at)
    entry["max_attempts"] = max_attempts
    return entry


def failure_line(f: dict[str, Any]) -> str:
    """One failure for the terminal; a waiting delivery as "attempt n of N, next at T"."""
    where = f"→ {f['destination']}" if f["destination"] else "(assessment)"
    if f.get("next_attempt_at") and f["state"] == "failed":
        limit = f" of {f['max_attempts']}" if f.get("max_attempts") else ""
        progress = f"waiting: attempt {f['attempts']}{limit} failed, next at " \
                   f"{f['next_attempt_at']}"
    else:
        progress = f"{f['state']} after {f['attempts']} attempt(s)"
    return (f"  {f['series_instance_uid']} job {f['job_id']} {where} {progress}: "
            f"{f['last_error'] or '-'}")


def oldest_waiting(ledger: Ledger, now: dt.datetime) -> dict[str, Any] | None:
    """The series that has been in a waiting state the longest, or None."""
    waiting = ledger.list_series(states=WAITING_STATES)
    if not waiting:
        return None
    oldest = min(waiting, key=lambda s: s.state_changed_at)
    return {
        "series_instance_uid": oldest.series_instance_uid,
        "state": oldest.state.value,
        "since": _iso(oldest.state_changed_at),
        "waiting_seconds": round((now - oldest.state_changed_at).total_seconds(), 1),
    }


def series_number(ledger: Ledger, info: SeriesInfo, spool: Path | None) -> int | None:
    """Series Number (0020,0011) from the header of one of the series' spool files.

    The ledger keeps no series number; None when the spool is not reachable from here
    (``spool`` None, a status run on another host) or the file has none.
    """
    if spool is None:
        return None
    relpaths = ledger.instance_relpaths(info.series_instance_uid)
    if not relpaths:
        return None
    try:
        ds = pydicom.dcmread(spool / relpaths[0], stop_before_pixels=True,
                             specific_tags=[SERIES_NUMBER])
    except (OSError, InvalidDicomError):
        return None
    try:
        return int(ds[SERIES_NUMBER].value)
    except (KeyError, TypeError, ValueError):  # absent, empty or not a number
        return None


def score_entry(ledger: Ledger, info: SeriesInfo) -> dict[str, Any]:
    """The current generation's assessment score, if any (the LDCTIQA 0–4 scale of
    :mod:`inference.result`, with its word)."""
    entry: dict[str, Any] = {"score": None, "score_label": None}
    for job in reversed(ledger.jobs_of_series(info.series_instance_uid)):
        if job.generation != info.generation or job.result_json is None:
            continue
        try:
            score = float(json.loads(job.result_json)["score"])
            entry.update(score=score, score_label=score_label(score))
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable result shows as no score; the job's state tells why
        break
    return entry


def series_details(ledger: Ledger, info: SeriesInfo, spool: Path | None) -> dict[str, Any]:
    """Series number and score of one series, for the listing."""
    return {"series_number": series_number(ledger, info, spool)} | score_entry(ledger, info)


#: Width of the TRIGGER column: the longest trigger, ``mpps_discontinued``.
TRIGGER_WIDTH = 17


def series_header() -> str:
    """The heading of the text listing's series table."""
    return (f"{'SERIES INSTANCE UID':<64}  {'STATE':<10} {'IMAGES':>6}  "
            f"{'TRIGGER':<{TRIGGER_WIDTH}} {'NO.':>5} {'SCORE':>5}  DESCRIPTION")


def series_row(s: dict[str, Any]) -> str:
    """One series of the text listing (see :func:`series_header`)."""
    number = "-" if s.get("series_number") is None else str(s["series_number"])
    score = "-" if s.get("score") is None else f"{s['score']:.1f}"
    return (f"{s['series_instance_uid']:<64}  {s['state']:<10} {s['instance_count']:>6}  "
            f"{s['trigger'] or '-':<{TRIGGER_WIDTH}} {number:>5} {score:>5}  "
            f"{s.get('description') or '-'}")


def build_report(ledger: Ledger, limit: int = DEFAULT_LIMIT,
                 reports: Path | None = None, spool: Path | None = None,
                 max_attempts: int | None = None) -> dict[str, Any]:
    """Everything ``qcnode status`` shows, as a JSON-ready dict.

    ``reports`` is the node's reports directory (``<home>/reports``); report paths
    are shown under it (relative to it when None). ``max_attempts`` is the configured
    ``[delivery]`` limit, shown with waiting deliveries.
    """
    now = dt.datetime.now(dt.UTC)
    root = reports if reports is not None else Path()
    return {
        "generated_at": _iso(now),
        "counts": {state.value: n for state, n in ledger.series_counts().items()},
        "oldest_waiting": oldest_waiting(ledger, now),
        "series": [series_entry(s) | series_details(ledger, s, spool)
                   | report_entry(ledger, s, root) for s in ledger.list_series(limit=limit)],
        "failures": [failure_entry(f, max_attempts) for f in ledger.list_failed()],
    }


def journal_state(home: Path) -> dict[str, Any] | None:
    """What the node's journal applier last reported (``<home>/journal/state.json``)."""
    try:
        state = json.loads((home / "journal" / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def render_text(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal."""
    counts = ", ".join(f"{state} {n}" for state, n in report["counts"].items() if n)
    lines = [f"series by state: {counts or 'none'}"]
    journal = report.get("journal")
    if journal and (journal.get("waiting") or journal.get("failing")):
        line = (f"receive journal: {journal['waiting']} image(s) acknowledged, not yet in "
                f"the spool/ledger (oldest {journal.get('oldest_waiting_seconds')} s)")
        if journal.get("failing"):
            line += f"; retrying after: {journal.get('last_error')}"
        lines.append(line)
    oldest = report["oldest_waiting"]
    if oldest is not None:
        lines.append(
            f"oldest waiting: {oldest['series_instance_uid']} {oldest['state']} "
            f"for {oldest['waiting_seconds']:.0f} s"
        )
    if report["series"]:
        lines.append(series_header())
        for s in report["series"]:
            lines.append(series_row(s))
            if s.get("note"):
                lines.append(f"  {s['note']}")
            elif s.get("report_path"):
                lines.append(f"  report {s['report_path']}")
    queues = report.get("queues")
    if queues is not None:
        depth = ", ".join(f"{q} {'?' if n is None else n}" for q, n in queues.items())
        note = report.get("queues_note")
        lines.append(f"queue depths: {depth}{f' ({note})' if note else ''}")
    lines.append(f"failures: {len(report['failures'])}")
    lines.extend(failure_line(f) for f in report["failures"])
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> Settings | None:
    try:
        return load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None


def missing_home(settings: Settings, config: Path | None) -> str | None:
    """Why status cannot look at this node: its home (which holds the default ledger)
    does not exist — a relative home from the wrong directory, or the wrong file.
    None when it exists, or when the ledger is configured elsewhere (PostgreSQL)."""
    home = settings.node.home
    if settings.ledger.url is not None or home.is_dir():
        return None
    where = f"settings {config}" if config is not None else "built-in defaults"
    relative = "" if home.is_absolute() else (
        f" (relative to the current directory {Path.cwd()}: run from the node's working "
        "directory, or set an absolute [node] home)")
    return (f"node home {home.absolute()} does not exist{relative}; {where}; "
            f"give the node's settings with --config or ${CONFIG_ENV}")


def emit(text: str) -> int:
    """Print ``text``; a reader that went away (``qcnode status | head -1``) ends the
    output quietly: no traceback, and none at exit when Python flushes stdout."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    """``qcnode status [--json] [--limit N]``."""
    settings = _settings(args)
    if settings is None:
        return EXIT_FAILURE
    problem = missing_home(settings, resolve_config_path(getattr(args, "config", None)))
    if problem is not None:
        print(f"qcnode status: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    limit = getattr(args, "limit", None) or DEFAULT_LIMIT
    from node.pipeline.app import GPU, IO, missing_broker, queue_depths
    from node.pipeline.reports import reports_root

    spool = settings.spool_dir if settings.spool_dir.is_dir() else None
    with Ledger.open(settings.ledger_url) as ledger:
        report = build_report(ledger, limit=limit, reports=reports_root(settings).resolve(),
                              spool=spool, max_attempts=settings.delivery.max_attempts)
    report["journal"] = journal_state(settings.node.home)
    report["queues_note"] = missing_broker(settings)
    report["queues"] = ({GPU: None, IO: None} if report["queues_note"]
                        else queue_depths(settings))
    if getattr(args, "json", False):
        return emit(json.dumps(report, indent=2))
    return emit(render_text(report))


def retry_main(args: argparse.Namespace) -> int:
    """``qcnode retry SERIES|--failed``: re-queue dead-lettered jobs and dispatch them.

    Jobs of the series' current generation that failed or were dead-lettered go back
    to ``pending`` (attempts reset, last error kept) and are prepared and enqueued
    again; the node's workers (or ``qcnode worker``) pick them up. Prints one line per
    re-queued job; exit status 1 when there was nothing to re-queue.
    """
    settings = _settings(args)
    if settings is None:
        return EXIT_FAILURE
    from node.logs import configure_logging
    from node.pipeline.dispatch import Dispatcher

    configure_logging(settings.logging.level, settings.logging.json_output)
    series = None if getattr(args, "failed", False) else args.series
    with Ledger.open(settings.ledger_url) as ledger, Dispatcher(settings, ledger) as dispatcher:
        jobs = dispatcher.retry(series)
        waiting = [f for f in ledger.list_failed() if f.next_attempt_at is not None
                   and f.state == "failed" and series in (None, f.series_instance_uid)]
    for job in jobs:
        print(f"re-queued {job.series_instance_uid} job {job.id}")
    if not jobs:
        print(f"nothing to re-queue{f' for {series}' if series else ''}", file=sys.stderr)
        for f in waiting:
            print(f"{f.series_instance_uid} → {f.destination}: attempt {f.attempts} of "
                  f"{settings.delivery.max_attempts} failed, next at "
                  f"{_iso(f.next_attempt_at)} (retried by itself)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
