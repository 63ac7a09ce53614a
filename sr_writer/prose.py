"""Plain-language lines shared by the SR's group comments, the text SR and the PDF card.

Lines are short and each names what it states, because some viewers hide the concept
names of SR content items and others run items together (OHIF's text view).
"""

from __future__ import annotations

from pydicom.valuerep import PersonName

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


def series_label(result: AssessmentResult) -> str:
    """E.g. ``Series quality 2.20 ± 0.45 of 4 (fair)``."""
    return f"Series quality {result.score:.2f}{_pm(result.uncertainty)} of 4 ({result.label})"


def slice_label(n: int, s: SliceScore) -> str:
    """E.g. ``Slice 3 quality 1.20 of 4 (poor)`` (``n``: position among assessed slices)."""
    return f"Slice {n} quality {s.score:.2f}{_pm(s.uncertainty)} of 4 ({score_label(s.score)})"


def scale_line() -> str:
    """The scale's meaning, e.g. ``Scale 0–4: 0 bad, 1 poor, …``."""
    return f"Scale 0–4 (LDCTIQA): {SCALE}"


def _in(numbers: dict[str, int], sop_instance_uid: str | None) -> str:
    if sop_instance_uid is None:
        return "series"
    n = numbers.get(sop_instance_uid)
    return f"slice {n}" if n is not None else f"image {sop_instance_uid}"


def finding_label(f: Finding, numbers: dict[str, int]) -> str:
    """E.g. ``Streak artifact, severe (slice 3)``; ``numbers`` from :func:`slice_numbers`."""
    where = _in(numbers, f.sop_instance_uid)
    return f"{codes.FINDING_CODES[f.kind].meaning}, {f.severity.value} ({where})"


def finding_line(f: Finding, numbers: dict[str, int]) -> str:
    """:func:`finding_label` with the description, e.g. ``… (slice 3) – from the hip``."""
    text = finding_label(f, numbers)
    return f"{text} – {f.description}" if f.description else text


def _value(m: Measurement) -> str:
    unit = UNIT_WORDS.get(m.unit, m.unit)
    return f"{m.value:g}{' ' + unit if unit else ''}"


def evidence_label(m: Measurement, numbers: dict[str, int]) -> str:
    """E.g. ``Standard Deviation of Attenuation Coefficient (Soft tissue) 22.4 HU (slice 3)``."""
    name, site = codes.EVIDENCE_CODES[m.name]
    label = name.meaning + (f" ({site.meaning})" if site is not None else "")
    return f"{label} {_value(m)} ({_in(numbers, m.sop_instance_uid)})"


def evidence_line(m: Measurement, numbers: dict[str, int]) -> str:
    """:func:`evidence_label` with the description."""
    text = evidence_label(m, numbers)
    return f"{text} – {m.description}" if m.description else text


def evidence_value(m: Measurement, numbers: dict[str, int]) -> str:
    """The value alone, for an item named by the measurement's concept, e.g. ``22.4 HU in
    soft tissue (slice 3) – SD in soft tissue``."""
    _, site = codes.EVIDENCE_CODES[m.name]
    text = _value(m) + (f" in {site.meaning.lower()}" if site is not None else "")
    text += f" ({_in(numbers, m.sop_instance_uid)})"
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


def _words(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def person_name(value: object) -> str:
    """A DICOM PN (PS3.5 6.2) for people: ``Muster^Jürgen^^Dr.`` → ``Muster, Dr. Jürgen``.

    Family name first, then a comma and prefix, given and middle names, then the suffix;
    an ideographic representation follows in parentheses in its own order
    (``山田^太郎`` → ``山田 太郎``). Empty for an empty name.
    """
    pn = value if isinstance(value, PersonName) else PersonName(str(value))
    groups = str(pn).split("=")
    alphabetic = groups[0].split("^") + [""] * 5
    family, given, middle, prefix, suffix = (p.strip() for p in alphabetic[:5])
    rest = _words(prefix, given, middle)
    text = f"{family}, {rest}" if family and rest else family or rest
    text += f", {suffix}" if suffix and text else suffix
    if len(groups) > 1 and groups[1].strip("^"):
        ideographic = _words(*(p.strip() for p in groups[1].split("^")))
        text = f"{text} ({ideographic})" if text else ideographic
    return text
