"""Plain-language lines shared by the text SR and the PDF quality card.

Every line names what it states, because some viewers (OHIF's text tree) hide the
concept names of SR content items.
"""

from __future__ import annotations

from inference.result import (
    SCORE_LABELS,
    AssessmentResult,
    EngineInfo,
    Finding,
    Measurement,
    SliceScore,
    score_label,
)
from sr_writer import codes

SCALE = ", ".join(f"{n} {label}" for n, label in enumerate(SCORE_LABELS))
UNIT_WORDS = {"[hnsf'U]": "HU", "1": "", "mm": "mm", "/mm": "/mm"}


def _pm(uncertainty: float | None) -> str:
    return "" if uncertainty is None else f" ± {uncertainty:.2f}"


def score_line(result: AssessmentResult) -> str:
    """E.g. ``Image quality rating (series): 2.20 ± 0.45 of 4 (fair)``."""
    return (
        f"Image quality rating (series): {result.score:.2f}{_pm(result.uncertainty)} of 4 "
        f"({result.label}); scale {SCALE}"
    )


def slice_line(n: int, s: SliceScore) -> str:
    """E.g. ``Image quality rating, slice 3: 1.20 of 4 (poor)``."""
    return (
        f"Image quality rating, slice {n}: {s.score:.2f}{_pm(s.uncertainty)} of 4 "
        f"({score_label(s.score)})"
    )


def finding_line(f: Finding, where: str) -> str:
    """E.g. ``Finding: Streak artifact, severe (slice 3) – streaks from the left hip``."""
    text = f"Finding: {codes.FINDING_CODES[f.kind].meaning}, {f.severity.value}"
    text += f" ({where})" if where else ""
    return f"{text} – {f.description}" if f.description else text


def evidence_line(m: Measurement, where: str) -> str:
    """E.g. ``Measured: Standard Deviation of Attenuation Coefficient (Soft tissue): 22.4 HU``."""
    name, site = codes.EVIDENCE_CODES[m.name]
    label = name.meaning + (f" ({site.meaning})" if site is not None else "")
    unit = UNIT_WORDS.get(m.unit, m.unit)
    text = f"Measured: {label}: {m.value:g}{' ' + unit if unit else ''}"
    text += f" ({where})" if where else ""
    return f"{text} – {m.description}" if m.description else text


def engine_line(engine: EngineInfo) -> str:
    """E.g. ``Algorithm: physics 0.1.0, model rev-abc``."""
    text = f"Algorithm: {engine.name} {engine.version}"
    if engine.model_revision:
        text += f", model {engine.model_revision}"
    if engine.adapter_revision:
        text += f", adapter {engine.adapter_revision}"
    return text


def slice_numbers(result: AssessmentResult) -> dict[str, int]:
    """SOP Instance UID → 1-based position among the assessed slices."""
    return {s.sop_instance_uid: n for n, s in enumerate(result.slices, 1)}


def where(result: AssessmentResult, sop_instance_uid: str | None) -> str:
    """``slice N`` for an assessed slice, ``image <uid>`` otherwise, ``""`` for the series."""
    if sop_instance_uid is None:
        return ""
    n = slice_numbers(result).get(sop_instance_uid)
    return f"slice {n}" if n is not None else f"image {sop_instance_uid}"
