"""`qcnode assess PATH…`: offline assessment of CT series, no server, no config.

Files and folders in; one result per series out (human-readable, or one JSON object per
line with ``--json``); optionally, per series in ``--sr-out DIR``, the TID 1500 SR and its
companions, as a node sends them: the Basic Text SR and the Encapsulated PDF quality
card with the worst slice (``SR_…``, ``TEXT_…``, ``PDF_…`` ``.dcm``, named by SOP
Instance UID). Every
problem (non-CT input, one-slice series, corrupt pixel data, a missing model directory)
is one line on stderr naming it, and a non-zero exit code; never a traceback. A file that
is not a DICOM image instance is skipped with a one-line warning naming it and why; the
rest is still assessed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

import pydicom
import structlog
from tqdm import tqdm

from inference.dicom import Header, PrepareError
from inference.engine import Engine, EngineError, create_engine, engine_window
from inference.prepare import PreparedSeries, prepare_series, scan
from inference.result import AssessmentResult

EXIT_OK = 0
EXIT_FAILURE = 1
#: Show a progress bar from this many instances on (tqdm hides it when not on a TTY).
PROGRESS_MIN_INSTANCES = 50


def _fail(message: str) -> None:
    print(f"qcnode assess: {message}", file=sys.stderr)


def _warn_skipped(path: Path, reason: str) -> None:
    print(f"qcnode assess: warning: skipped {path}: {reason}", file=sys.stderr)


def _human(result: AssessmentResult) -> str:
    lines = [
        f"series {result.series_instance_uid}",
        f"  score {result.score:.1f} ({result.label})"
        + (f" ± {result.uncertainty:.1f}" if result.uncertainty is not None else "")
        + f"   engine {result.engine.name} {result.engine.version}",
        f"  {result.explanation}",
    ]
    for f in result.findings:
        lines.append(f"  finding: {f.kind.value} ({f.severity.value}) {f.description}")
    for note in result.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


#: File name prefix of each object ``--sr-out`` writes, by :mod:`sr_writer` builder.
REPORT_FILES = (("build_sr", "SR"), ("build_text_sr", "TEXT"), ("build_pdf", "PDF"))


def _worst_rgb(series: PreparedSeries, result: AssessmentResult) -> Any:
    """The rendered worst slice (for the PDF card), or None."""
    worst = result.worst_slice
    return next((s.rgb for s in series.slices if worst is not None
                 and (s.sop_instance_uid, s.frame) == (worst.sop_instance_uid, worst.frame)),
                None)


def write_sr(result: AssessmentResult, series: PreparedSeries, headers: list[Header],
             engine: Engine, out: Path) -> list[Path]:
    """Write the series' SR (:func:`sr_writer.build_sr`) and its companions, the Basic
    Text SR and the PDF card, into ``out``; returns their paths, the SR first."""
    try:
        sr_module: Any = import_module("sr_writer")
    except ImportError as exc:
        raise EngineError(f"--sr-out needs the sr_writer package, which is missing: {exc}"
                          ) from exc
    assessed = {s.sop_instance_uid for s in series.slices}
    sources = [
        pydicom.dcmread(h.path, stop_before_pixels=True)
        for h in headers
        if h.frames and h.frames[0].sop_instance_uid in assessed
    ]
    job_key = f"{result.series_instance_uid}|{engine.info.key}"
    created = datetime.datetime.now()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for builder, prefix in REPORT_FILES:
        extra = {"image": _worst_rgb(series, result)} if prefix == "PDF" else {}
        ds = getattr(sr_module, builder)(sources, result, job_key=job_key, created=created,
                                         **extra)
        path = out / f"{prefix}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _assess_one(headers: list[Header], engine: Engine, args: argparse.Namespace,
                window: Any) -> AssessmentResult:
    series = prepare_series(headers, k=args.slices, window=window)
    result = engine.assess(series)
    if args.sr_out is not None:
        write_sr(result, series, headers, engine, args.sr_out)
    return result


def _logs_to_stderr() -> None:
    """Log lines (structlog's default goes to stdout) on stderr: stdout holds only the
    results, one JSON object per line with ``--json``."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


def assess_main(args: argparse.Namespace) -> int:
    """The ``qcnode assess`` handler; returns the exit code."""
    _logs_to_stderr()
    try:
        engine = create_engine(args.engine, model=args.model, adapter=args.adapter)
        window = engine_window(args.engine, model=args.model, adapter=args.adapter)
        found = scan(list(args.paths))
    except (EngineError, PrepareError, OSError, ValueError, ImportError) as exc:
        _fail(str(exc))
        return EXIT_FAILURE
    for path, reason in found.skipped:
        _warn_skipped(path, reason)
    groups = found.series
    if not groups:
        _fail(f"no DICOM image instances found in {', '.join(map(str, args.paths))}")
        return EXIT_FAILURE
    failures = 0
    instances = sum(len(h) for h in groups.values())
    bar = tqdm(total=instances, unit="img", file=sys.stderr, desc="assess",
               disable=None if instances >= PROGRESS_MIN_INSTANCES else True)
    with bar:
        for uid, headers in groups.items():
            try:
                result = _assess_one(headers, engine, args, window)
            except (PrepareError, EngineError, ValueError, OSError) as exc:
                failures += 1
                bar.clear()
                _fail(f"series {uid}: {exc}")
                bar.update(len(headers))
                continue
            except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, no traceback
                failures += 1
                bar.clear()
                _fail(f"series {uid}: unexpected {type(exc).__name__}: {exc}")
                bar.update(len(headers))
                continue
            bar.update(len(headers))
            bar.clear()
            if args.json:
                print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
            else:
                print(_human(result), flush=True)
    return EXIT_FAILURE if failures else EXIT_OK
