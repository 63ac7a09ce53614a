"""The files ``qcnode evaluate`` writes: JSON, Markdown, scatter plot, predictions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.dataset import Record
from inference.metrics import Agreement, Estimate

if TYPE_CHECKING:
    from inference.evaluate import RunResult

REPORT_SCHEMA = 1
_ROWS = (("SRCC", "srcc"), ("PLCC", "plcc"), ("KROCC", "krocc"), ("MAE", "mae"),
         ("RMSE", "rmse"), (r"aggregate \|PLCC\|+\|SRCC\|+\|KROCC\|", "aggregate"))
#: Published numbers to compare with (docs/training.md, REFERENCES.md).
REFERENCE_NUMBERS = {
    "MedGemma-4B-IT + QLoRA (100-image LDCTIQA hold-out)": {
        "srcc": 0.795, "plcc": 0.791, "mae": 0.578},
    "Gemini 2.5 Pro zero-shot": {"srcc": 0.733, "plcc": 0.720, "mae": 0.654},
}


def _run_dict(run: RunResult, records: Sequence[Record], worst: int) -> dict[str, Any]:
    from inference.evaluate import worst_cases

    return {
        "name": run.spec.name,
        "engine": run.spec.engine,
        "model": None if run.spec.model is None else str(run.spec.model),
        "adapter": None if run.spec.adapter is None else str(run.spec.adapter),
        "predictions_file": None if run.spec.predictions is None else str(run.spec.predictions),
        "agreement": None if run.agreement is None else run.agreement.to_dict(),
        "message": run.message,
        "missing": list(run.missing),
        "failed": {i: run.predictions[i].error for i in run.failed},
        "worst": worst_cases(records, run.predictions, worst),
    }


def write_report(
    out: Path, manifest: Path, records: Sequence[Record], runs: Sequence[RunResult],
    *, worst: int = 10, split: str | None = None,
) -> Path:
    """Write report.json, report.md, scatter.png and predictions-<run>.jsonl into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": REPORT_SCHEMA, "manifest": str(manifest), "split": split,
        "n_records": len(records), "runs": [_run_dict(r, records, worst) for r in runs],
        "reference_numbers": REFERENCE_NUMBERS,
    }
    (out / "report.json").write_text(
        json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    for run in runs:
        with (out / f"predictions-{run.spec.name}.jsonl").open("w", encoding="utf-8") as fh:
            for rec in records:
                if rec.id in run.predictions:
                    fh.write(json.dumps(run.predictions[rec.id].to_dict(), ensure_ascii=False)
                             + "\n")
    text = markdown(data, runs)
    try:
        scatter(out / "scatter.png", records, runs)
        text += "\n![predicted vs radiologist score](scatter.png)\n"
    except ImportError:  # matplotlib comes with the [gpu] extra, not the listener install
        text += "\n(no scatter plot: matplotlib is not installed)\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return out


def _cell(est: Estimate | None) -> str:
    return "—" if est is None else est.fmt()


def markdown(data: dict[str, Any], runs: Sequence[RunResult]) -> str:
    """The human-readable report."""
    names = [r.spec.name for r in runs]
    lines = [
        "# qcnode evaluation", "",
        f"Manifest `{data['manifest']}`" + (f", split `{data['split']}`" if data["split"] else "")
        + f": {data['n_records']} labelled record(s). Intervals: bootstrap 95 % "
        f"({_first_agreement(runs, 'bootstrap')} resamples, "
        f"seed {_first_agreement(runs, 'seed')}).",
        "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
    ]
    lines.append("| n | " + " | ".join(str(r.agreement.n) if r.agreement else "0" for r in runs)
                 + " |")
    for label, key in _ROWS:
        cells = [_cell(getattr(r.agreement, key)) if r.agreement else "—" for r in runs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Published reference numbers: fine-tuned MedGemma-4B-IT SRCC 0.795 / PLCC "
              "0.791 / MAE 0.578 (100-image LDCTIQA hold-out); Gemini 2.5 Pro zero-shot SRCC "
              "0.733.", ""]
    for run, rd in zip(runs, data["runs"], strict=True):
        lines += _run_section(run, rd)
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _first_agreement(runs: Sequence[RunResult], attr: str) -> Any:
    for r in runs:
        if r.agreement is not None:
            return getattr(r.agreement, attr)
    return "—"


def _run_section(run: RunResult, rd: dict[str, Any]) -> list[str]:
    lines = [f"## {run.spec.name}", ""]
    if run.message:
        lines += [f"**{run.message}**", ""]
    a: Agreement | None = run.agreement
    if a is not None:
        lines += [f"- {note}" for note in a.notes] + ([""] if a.notes else [])
        lines += ["Calibration (predictions rounded to a score class):", "",
                  "| predicted class | n | mean predicted | mean reference | mean error |",
                  "|---|---|---|---|---|"]
        for c in a.calibration:
            lines.append(f"| {c.predicted_class} | {c.n} | {_num(c.mean_predicted)} | "
                         f"{_num(c.mean_reference)} | {_num(c.mean_error)} |")
        lines.append("")
    if run.failed:
        lines += [f"{len(run.failed)} record(s) failed:", ""]
        lines += [f"- `{i}`: {run.predictions[i].error}" for i in run.failed[:20]] + [""]
    if run.missing:
        lines += [f"{len(run.missing)} record(s) have no prediction (first: "
                  f"{', '.join(run.missing[:5])}).", ""]
    if rd["worst"]:
        lines += ["Worst disagreements:", "",
                  "| id | reference | predicted | error | explanation |", "|---|---|---|---|---|"]
        for w in rd["worst"]:
            text = w["explanation"].replace("|", "/").replace("\n", " ")[:120]
            lines.append(f"| `{w['id']}` | {w['reference']:.2f} | {w['predicted']:.2f} | "
                         f"{w['error']:+.2f} | {text} |")
        lines.append("")
    return lines


def scatter(path: Path, records: Sequence[Record], runs: Sequence[RunResult]) -> None:
    """Predicted vs reference score, one panel per run, identity line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), dpi=100,
                             squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        pairs = [(r.score, run.predictions[r.id].score) for r in records
                 if r.id in run.predictions and run.predictions[r.id].score is not None]
        ax.scatter([t for t, _ in pairs], [p for _, p in pairs], s=14, alpha=0.7)
        ax.plot([0, 4], [0, 4], linestyle="--", color="grey", linewidth=1)
        ax.set(xlim=(-0.1, 4.1), ylim=(-0.1, 4.1), xlabel="radiologist score",
               ylabel="predicted score", aspect="equal")
        title = run.spec.name
        if run.agreement is not None and run.agreement.srcc.value is not None:
            title += f"\nSRCC {run.agreement.srcc.value:.3f}  MAE {run.agreement.mae.value:.3f}"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
