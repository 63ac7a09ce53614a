"""Plain-language lines shared by the SR's group comments, the text SR and the PDF card.

Lines are short and each names what it states, because some viewers hide the concept
names of SR content items and others run items together (OHIF's text view).

Written for people: an image is named by its Instance Number (``slice 11``, the number
the viewer shows beside it, :func:`inference.result.slice_reference`), never by its
position among the assessed slices; scores and HU values are rounded to one decimal
(the coded NUM items of the TID 1500 SR keep full precision).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from inference.dicom import instance_number
from inference.result import (
    SCORE_LABELS,
    AssessmentResult,
    EngineInfo,
    Finding,
    Measurement,
    SliceScore,
    score_label,
    slice_reference,
)
from sr_writer import codes

SCALE = ", ".join(f"{n} {label}" for n, label in enumerate(SCORE_LABELS))
UNIT_WORDS = {"[hnsf'U]": "HU", "1": "", "mm": "mm", "/mm": "/mm"}
#: Decimals shown per UCUM unit: HU, ratios and mm to one decimal, MTF50 (/mm) to two.
UNIT_DECIMALS = {"[hnsf'U]": 1, "1": 1, "mm": 1, "/mm": 2}
#: SOP Instance UID → Instance Number, from :func:`instance_numbers`.
Numbers = dict[str, int]


def _pm(uncertainty: float | None) -> str:
    return "" if uncertainty is None else f" ± {uncertainty:.1f}"


def series_label(result: AssessmentResult) -> str:
    """E.g. ``Series quality 2.2 ± 0.5 of 4 (fair)``."""
    return f"Series quality {result.score:.1f}{_pm(result.uncertainty)} of 4 ({result.label})"


def instance_numbers(sources: Iterable[Dataset]) -> Numbers:
    """SOP Instance UID → Instance Number of each source that has one."""
    numbers = {str(ds.SOPInstanceUID): instance_number(ds) for ds in sources}
    return {uid: n for uid, n in numbers.items() if n is not None}


def _image(numbers: Numbers, sop_instance_uid: str, frame: int | None = None) -> str:
    """``slice 11`` / ``image 4 frame 12`` by Instance Number, else ``image <UID>``."""
    return (slice_reference(numbers.get(sop_instance_uid), frame)
            or f"image {sop_instance_uid}" + (f" frame {frame}" if frame is not None else ""))


def slice_label(s: SliceScore, numbers: Numbers) -> str:
    """E.g. ``Slice 11 quality 1.2 of 4 (poor)`` (11: the slice's Instance Number)."""
    where = _image(numbers, s.sop_instance_uid, s.frame)
    return (f"{where[0].upper()}{where[1:]} quality {s.score:.1f}{_pm(s.uncertainty)} "
            f"of 4 ({score_label(s.score)})")


def scale_line() -> str:
    """The scale's meaning, e.g. ``Scale 0–4: 0 bad, 1 poor, …``."""
    return f"Scale 0–4 (LDCTIQA): {SCALE}"


def _in(numbers: Numbers, sop_instance_uid: str | None, frame: int | None = None) -> str:
    return "series" if sop_instance_uid is None else _image(numbers, sop_instance_uid, frame)


def finding_label(f: Finding, numbers: Numbers) -> str:
    """E.g. ``Streak artifact, severe (slice 11)``; ``numbers`` from :func:`instance_numbers`."""
    where = _in(numbers, f.sop_instance_uid, f.region.frame if f.region else None)
    return f"{codes.FINDING_CODES[f.kind].meaning}, {f.severity.value} ({where})"


def finding_line(f: Finding, numbers: Numbers) -> str:
    """:func:`finding_label` with the description, e.g. ``… (slice 11) – from the hip``."""
    text = finding_label(f, numbers)
    return f"{text} – {f.description}" if f.description else text


def _value(m: Measurement) -> str:
    """The value rounded for people (:data:`UNIT_DECIMALS`), with its unit in words."""
    unit = UNIT_WORDS.get(m.unit, m.unit)
    value = f"{m.value:.{UNIT_DECIMALS[m.unit]}f}" if m.unit in UNIT_DECIMALS else f"{m.value:g}"
    return f"{value}{' ' + unit if unit else ''}"


def _where(m: Measurement, numbers: Numbers) -> str:
    return _in(numbers, m.sop_instance_uid, m.region.frame if m.region else None)


def evidence_label(m: Measurement, numbers: Numbers) -> str:
    """E.g. ``Standard Deviation of Attenuation Coefficient (Soft tissue) 22.4 HU (slice 11)``."""
    name, site = codes.EVIDENCE_CODES[m.name]
    label = name.meaning + (f" ({site.meaning})" if site is not None else "")
    return f"{label} {_value(m)} ({_where(m, numbers)})"


def evidence_line(m: Measurement, numbers: Numbers) -> str:
    """:func:`evidence_label` with the description."""
    text = evidence_label(m, numbers)
    return f"{text} – {m.description}" if m.description else text


def evidence_value(m: Measurement, numbers: Numbers) -> str:
    """The value alone, for an item named by the measurement's concept, e.g. ``22.4 HU in
    soft tissue (slice 11) – SD in soft tissue``."""
    _, site = codes.EVIDENCE_CODES[m.name]
    text = _value(m) + (f" in {site.meaning.lower()}" if site is not None else "")
    text += f" ({_where(m, numbers)})"
    return f"{text} – {m.description}" if m.description else text


def engine_line(engine: EngineInfo) -> str:
    """E.g. ``Algorithm: physics 0.1.0, model rev-abc``."""
    text = f"Algorithm: {engine.name} {engine.version}"
    if engine.model_revision:
        text += f", model {engine.model_revision}"
    if engine.adapter_revision:
        text += f", adapter {engine.adapter_revision}"
    return text


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
