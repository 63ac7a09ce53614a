"""``qcnode evaluate``: how well an engine agrees with radiologists on a labelled manifest.

Runs an engine (``physics`` or ``vlm`` with ``--model``/``--adapter``) over every record
of a JSONL manifest (:mod:`inference.dataset`), or reads saved predictions, and writes
into ``--out``: ``report.json`` and ``report.md`` (SRCC, PLCC, KROCC, MAE, RMSE with
seeded bootstrap 95 % CIs, the LDCTIQA aggregate |PLCC|+|SRCC|+|KROCC|, a calibration
table, the worst-disagreeing cases), ``scatter.png`` and ``predictions-<run>.jsonl``
(which ``--predictions`` reads back). ``--compare SPEC`` adds a second run on the same
images, side by side: ``physics``, ``vlm`` (the base model without adapter),
``adapter=DIR`` (the same base with another adapter) or ``predictions=FILE``.

Examples::

    qcnode evaluate ldctiqa.jsonl --split test --engine vlm --model /models/medgemma-4b-it \\
        --adapter adapters/ldctiqa --compare vlm --out eval/ldctiqa-test
    qcnode evaluate site.jsonl --predictions eval/old/predictions-vlm.jsonl --compare physics
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from inference.dataset import Record, load_prepared, read_manifest
from inference.metrics import Agreement, DegenerateInputError, agreement

log = structlog.get_logger(__name__)


class EvaluateError(ValueError):
    """An evaluation cannot run (bad spec, unreadable predictions, nothing to compare)."""


@dataclass(frozen=True)
class Prediction:
    """One engine output for one record (``error`` set when the engine failed on it)."""

    id: str
    score: float | None
    uncertainty: float | None = None
    explanation: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A ``predictions-*.jsonl`` line."""
        return {"id": self.id, "score": self.score, "uncertainty": self.uncertainty,
                "explanation": self.explanation, "error": self.error}


@dataclass(frozen=True)
class RunSpec:
    """What produces one column of the report."""

    name: str
    engine: str | None = None  # "physics" | "vlm"
    model: Path | None = None
    adapter: Path | None = None
    predictions: Path | None = None
    #: scores parsed from the generated text (the paper's metric), beside a read-out run
    written: bool = False


@dataclass(frozen=True)
class RunResult:
    """Predictions and agreement of one run (records without a prediction are listed)."""

    spec: RunSpec
    predictions: dict[str, Prediction]
    agreement: Agreement | None
    missing: tuple[str, ...]
    failed: tuple[str, ...]
    message: str = ""


def parse_spec(text: str, *, model: Path | None) -> RunSpec:
    """``physics`` | ``vlm`` | ``adapter=DIR`` | ``predictions=FILE`` → :class:`RunSpec`."""
    kind, _, value = text.partition("=")
    if text == "physics":
        return RunSpec("physics", engine="physics")
    if text == "vlm":
        return RunSpec("vlm-base", engine="vlm", model=model)
    if kind == "adapter" and value:
        return RunSpec(f"vlm+{Path(value).name}", engine="vlm", model=model, adapter=Path(value))
    if kind == "predictions" and value:
        return RunSpec(f"saved-{Path(value).stem}", predictions=Path(value))
    raise EvaluateError(
        f"--compare {text!r}: use physics, vlm, adapter=DIR or predictions=FILE"
    )


def read_predictions(path: Path) -> dict[str, Prediction]:
    """A JSONL of ``{"id": …, "score": …}`` lines (``qcnode evaluate``'s own output)."""
    out: dict[str, Prediction] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvaluateError(f"cannot read predictions {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            key = str(data["id"])
            score = None if data.get("score") is None else float(data["score"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EvaluateError(f"{path} line {number}: needs 'id' and 'score' ({exc})") from exc
        out[key] = Prediction(key, score, data.get("uncertainty"),
                              data.get("explanation") or "", data.get("error"))
    return out


def run_engine(
    spec: RunSpec, records: Sequence[Record], *, k: int, device: str
) -> tuple[dict[str, Prediction], dict[str, Prediction] | None]:
    """Assess every record with the spec's engine; per-record failures are kept, not fatal.

    Returns the read-out predictions and, for the VLM, the paper's own metric's
    predictions: the score written in the generated answer of every assessed slice,
    parsed (:func:`~inference.vlm.parsing.parse_score`) and averaged — seed 000 reported
    its SRCC/PLCC/MAE on those; the read-out's are the report's.
    """
    from inference.engine import create_engine, engine_window

    assert spec.engine is not None
    engine = create_engine(spec.engine, model=spec.model, adapter=spec.adapter, device=device)
    window = engine_window(spec.engine, model=spec.model, adapter=spec.adapter)
    generate = getattr(engine, "generate", None)
    out: dict[str, Prediction] = {}
    text: dict[str, Prediction] | None = {} if callable(generate) else None
    for i, rec in enumerate(records, start=1):
        try:
            prepared = load_prepared(rec, window, k=k)
            result = engine.assess(prepared)
            if text is not None and callable(generate):
                text[rec.id] = _text_prediction(rec.id, generate(prepared.slices))
        except (ValueError, OSError, RuntimeError) as exc:
            out[rec.id] = Prediction(rec.id, None, error=f"{type(exc).__name__}: {exc}")
            log.warning("evaluate_record_failed", record=rec.id, error=type(exc).__name__)
            continue
        out[rec.id] = Prediction(rec.id, result.score, result.uncertainty, result.explanation)
        if i % 25 == 0:
            log.info("evaluate_progress", run=spec.name, done=i, total=len(records))
    return out, text


def _text_prediction(record_id: str, answers: Sequence[str]) -> Prediction:
    """The mean of the scores written in ``answers`` (None when no answer has one)."""
    from inference.vlm.parsing import parse_score

    parsed = [parse_score(a) for a in answers]
    scores = [s for s, _ in parsed if s is not None]
    if not scores:
        problems = sorted({p for _, p in parsed if p})
        return Prediction(record_id, None, explanation=answers[0] if answers else "",
                          error="; ".join(problems))
    return Prediction(record_id, sum(scores) / len(scores), explanation=answers[0])


def score_run(
    spec: RunSpec, records: Sequence[Record], predictions: dict[str, Prediction],
    *, n_boot: int, seed: int,
) -> RunResult:
    """Pair predictions with labels and compute the agreement."""
    missing = tuple(r.id for r in records if r.id not in predictions)
    failed = tuple(r.id for r in records
                   if r.id in predictions and predictions[r.id].score is None)
    pairs = [(r.score, predictions[r.id].score) for r in records
             if r.id in predictions and predictions[r.id].score is not None]
    if not pairs:
        return RunResult(spec, predictions, None, missing, failed,
                         "no record has a prediction: nothing to compare")
    try:
        agree = agreement([t for t, _ in pairs], [float(p) for _, p in pairs if p is not None],
                          n_boot=n_boot, seed=seed)
    except DegenerateInputError as exc:
        return RunResult(spec, predictions, None, missing, failed, str(exc))
    return RunResult(spec, predictions, agree, missing, failed)


def worst_cases(
    records: Sequence[Record], predictions: dict[str, Prediction], n: int
) -> list[dict[str, Any]]:
    """The ``n`` records with the largest |predicted − reference|."""
    scored = [(r, float(p.score)) for r in records
              if (p := predictions.get(r.id)) is not None and p.score is not None]
    scored.sort(key=lambda rp: (-abs(rp[1] - rp[0].score), rp[0].id))
    return [
        {"id": r.id, "image": str(r.image), "reference": r.score, "predicted": score,
         "error": score - r.score, "explanation": predictions[r.id].explanation[:300]}
        for r, score in scored[:n]
    ]


def _specs(ns: argparse.Namespace) -> list[RunSpec]:
    if ns.predictions is not None:
        primary = RunSpec(f"saved-{ns.predictions.stem}", predictions=ns.predictions)
    elif ns.engine == "vlm":
        name = "vlm" if ns.adapter is None else f"vlm+{ns.adapter.name}"
        primary = RunSpec(name, engine="vlm", model=ns.model, adapter=ns.adapter)
    else:
        primary = RunSpec("physics", engine="physics")
    specs = [primary]
    if ns.compare:
        second = parse_spec(ns.compare, model=ns.model)
        if second.name == primary.name:
            second = RunSpec(second.name + "-2", second.engine, second.model, second.adapter,
                             second.predictions)
        specs.append(second)
    return specs


def evaluate(ns: argparse.Namespace) -> list[RunResult]:
    """Run every spec over the manifest and write the report; returns the runs."""
    from inference.evaluate_report import write_report

    records = read_manifest(ns.manifest, split=ns.split)
    if not records:
        where = f" in split {ns.split!r}" if ns.split else ""
        raise EvaluateError(f"{ns.manifest}: no records{where}")
    runs = []
    for spec in _specs(ns):
        text = None
        if spec.predictions is not None:
            preds = read_predictions(spec.predictions)
        else:
            preds, text = run_engine(spec, records, k=ns.slices, device=ns.device)
        runs.append(score_run(spec, records, preds, n_boot=ns.bootstrap, seed=ns.seed))
        if text is not None:  # the paper's metric: the score written in the generated text
            text_spec = RunSpec(f"{spec.name}-text", spec.engine, spec.model, spec.adapter,
                                written=True)
            runs.append(score_run(text_spec, records, text, n_boot=ns.bootstrap, seed=ns.seed))
    write_report(ns.out, ns.manifest, records, runs, worst=ns.worst, split=ns.split)
    return runs


def main(ns: argparse.Namespace) -> int:
    """``qcnode evaluate`` handler: prints the headline numbers; 1 on an error."""
    from inference.engine import EngineError

    try:
        runs = evaluate(ns)
    except (ValueError, EngineError, OSError) as exc:  # EvaluateError, ManifestError, …
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for run in runs:
        a = run.agreement
        if a is None:
            print(f"{run.spec.name}: {run.message}")
            continue
        print(f"{run.spec.name}: n={a.n} SRCC {a.srcc.fmt()} PLCC {a.plcc.fmt()} "
              f"KROCC {a.krocc.fmt()} MAE {a.mae.fmt()} RMSE {a.rmse.fmt()} "
              f"aggregate {a.aggregate.fmt()}"
              + (f"; {len(run.failed)} failed" if run.failed else "")
              + (f"; {len(run.missing)} without prediction" if run.missing else ""))
    print(f"report: {ns.out / 'report.md'}")
    # a model that writes no parsable score fails only its text run, not the evaluation
    return 0 if all(r.agreement is not None for r in runs if not r.spec.written) else 1
