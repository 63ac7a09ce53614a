"""The outcome of a quality assessment: frozen dataclasses with a JSON round trip.

No torch, no pydicom: this module is shared by the listener host, the GPU workers and
the SR writer. Scores use the LDCTIQA five-point scale (0 bad, 1 poor, 2 fair, 3 good,
4 excellent); series scores may be fractional (e.g. an expected value).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

SCORE_MIN = 0.0
SCORE_MAX = 4.0
SCORE_LABELS = ("bad", "poor", "fair", "good", "excellent")
RESULT_SCHEMA_VERSION = 1


def score_label(score: float) -> str:
    """The LDCTIQA word for ``score`` (rounded to the nearest integer)."""
    _check_score(score, "score")
    return SCORE_LABELS[round(score)]


def slice_reference(instance_number: int | None, frame: int | None = None) -> str | None:
    """How every text shown to people names an image: by its Instance Number
    (0020,0013, PS3.3 C.7.6.1), the number a viewer shows beside it.

    ``slice 11`` for a single-frame image, ``image 4 frame 12`` for a frame of a
    multi-frame instance (whose frames share one Instance Number); None without an
    Instance Number (the caller names the image another way). Never an array index or a
    position among the assessed slices: those match nothing the radiologist sees.
    """
    if instance_number is None:
        return None
    if frame is None:
        return f"slice {instance_number}"
    return f"image {instance_number} frame {frame}"


def _check_score(value: float, name: str) -> None:
    if not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise ValueError(f"{name} {value} is outside the 0–4 quality scale")


def _check_uncertainty(value: float | None, name: str) -> None:
    if value is not None and (math.isnan(value) or value < 0):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


class FindingKind(StrEnum):
    """What kind of quality problem a finding describes."""

    NOISE = "noise"
    STREAK_ARTIFACT = "streak_artifact"
    METAL_ARTIFACT = "metal_artifact"
    MOTION = "motion"
    BEAM_HARDENING = "beam_hardening"
    LOW_CONTRAST = "low_contrast"
    BLUR = "blur"
    TRUNCATED_FOV = "truncated_fov"


class Severity(StrEnum):
    """How much a finding degrades the image."""

    NONE = "none"
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"


GraphicType = Literal["POINT", "POLYLINE", "POLYGON", "CIRCLE", "ELLIPSE"]


@dataclass(frozen=True)
class Region:
    """An image region in pixel coordinates (column, row) of one frame of one instance.

    ``points`` follow PS3.3 C.18.6.1.2 (SCOORD): a closed POLYGON repeats its first point
    last; a CIRCLE is (centre, a point on the circle); an ELLIPSE is the four end points
    of its axes.
    """

    sop_instance_uid: str
    graphic_type: GraphicType
    points: tuple[tuple[float, float], ...]
    frame: int | None = None

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise ValueError("region needs the SOP Instance UID it lies on")
        minimum = {"POINT": 1, "POLYLINE": 2, "POLYGON": 4, "CIRCLE": 2, "ELLIPSE": 4}
        if len(self.points) < minimum[self.graphic_type]:
            raise ValueError(
                f"{self.graphic_type} region needs at least {minimum[self.graphic_type]} points"
            )

    @staticmethod
    def box(
        sop_instance_uid: str, col0: float, row0: float, col1: float, row1: float,
        frame: int | None = None,
    ) -> Region:
        """A closed rectangular polygon."""
        pts = ((col0, row0), (col1, row0), (col1, row1), (col0, row1), (col0, row0))
        return Region(sop_instance_uid, "POLYGON", pts, frame)


@dataclass(frozen=True)
class Finding:
    """A coded quality finding, e.g. moderate noise, or severe metal streaks at one slice."""

    kind: FindingKind
    severity: Severity
    description: str = ""
    sop_instance_uid: str | None = None
    region: Region | None = None


@dataclass(frozen=True)
class Measurement:
    """Measured evidence: e.g. noise 22.4 ``[hnsf'U]`` in soft tissue of one slice.

    ``name`` is a key from :data:`MEASUREMENT_NAMES`; ``unit`` is a UCUM code.
    """

    name: str
    value: float
    unit: str
    description: str = ""
    sop_instance_uid: str | None = None
    region: Region | None = None

    def __post_init__(self) -> None:
        if self.name not in MEASUREMENT_NAMES:
            raise ValueError(
                f"unknown measurement {self.name!r}; known: {', '.join(MEASUREMENT_NAMES)}"
            )
        if math.isnan(self.value) or math.isinf(self.value):
            raise ValueError(f"measurement {self.name} is not a finite number")


#: The evidence an engine may report, with its UCUM unit.
MEASUREMENT_NAMES: dict[str, str] = {
    "noise_hu": "[hnsf'U]",
    "noise_fat_hu": "[hnsf'U]",
    "streak_index_hu": "[hnsf'U]",
    "contrast_hu": "[hnsf'U]",
    "cnr": "1",
    "edge_width_mm": "mm",
    "mtf50_per_mm": "/mm",
}


@dataclass(frozen=True)
class SliceScore:
    """The score of one assessed slice (one frame of one instance)."""

    sop_instance_uid: str
    score: float
    uncertainty: float | None = None
    frame: int | None = None
    region: Region | None = None

    def __post_init__(self) -> None:
        _check_score(self.score, f"slice {self.sop_instance_uid} score")
        _check_uncertainty(self.uncertainty, "slice uncertainty")


@dataclass(frozen=True)
class EngineInfo:
    """Which algorithm produced the result (reported as TID 4019 in the SR)."""

    name: str
    version: str
    model_revision: str | None = None
    adapter_revision: str | None = None

    @property
    def key(self) -> str:
        """Identity used in job keys: the same engine and weights give the same key."""
        return "|".join(
            (self.name, self.version, self.model_revision or "-", self.adapter_revision or "-")
        )


@dataclass(frozen=True)
class AssessmentResult:
    """The quality assessment of one series."""

    study_instance_uid: str
    series_instance_uid: str
    score: float
    uncertainty: float | None
    explanation: str
    engine: EngineInfo
    slices: tuple[SliceScore, ...] = ()
    findings: tuple[Finding, ...] = ()
    evidence: tuple[Measurement, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.series_instance_uid or not self.study_instance_uid:
            raise ValueError("result needs its study and series instance UIDs")
        _check_score(self.score, "series score")
        _check_uncertainty(self.uncertainty, "series uncertainty")

    @property
    def label(self) -> str:
        """The scale's word for the series score."""
        return score_label(self.score)

    @property
    def worst_slice(self) -> SliceScore | None:
        """The lowest-scoring slice (first on ties), or None without slice scores."""
        return min(self.slices, key=lambda s: s.score) if self.slices else None

    # JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``schema`` carries the format version)."""
        data = asdict(self)
        data["schema"] = RESULT_SCHEMA_VERSION
        data["label"] = self.label
        return data

    def to_json(self, **kwargs: Any) -> str:
        """JSON text; ``kwargs`` go to :func:`json.dumps`."""
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssessmentResult:
        """Inverse of :meth:`to_dict`."""
        schema = data.get("schema", RESULT_SCHEMA_VERSION)
        if schema != RESULT_SCHEMA_VERSION:
            raise ValueError(f"unsupported result schema {schema!r}")
        return cls(
            study_instance_uid=data["study_instance_uid"],
            series_instance_uid=data["series_instance_uid"],
            score=float(data["score"]),
            uncertainty=_opt_float(data.get("uncertainty")),
            explanation=data["explanation"],
            engine=EngineInfo(**data["engine"]),
            slices=tuple(_slice_from(d) for d in data.get("slices", ())),
            findings=tuple(_finding_from(d) for d in data.get("findings", ())),
            evidence=tuple(_measurement_from(d) for d in data.get("evidence", ())),
            notes=tuple(data.get("notes", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> AssessmentResult:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _region_from(data: dict[str, Any] | None) -> Region | None:
    if data is None:
        return None
    return Region(
        sop_instance_uid=data["sop_instance_uid"],
        graphic_type=data["graphic_type"],
        points=tuple((float(c), float(r)) for c, r in data["points"]),
        frame=data.get("frame"),
    )


def _slice_from(data: dict[str, Any]) -> SliceScore:
    return SliceScore(
        sop_instance_uid=data["sop_instance_uid"],
        score=float(data["score"]),
        uncertainty=_opt_float(data.get("uncertainty")),
        frame=data.get("frame"),
        region=_region_from(data.get("region")),
    )


def _finding_from(data: dict[str, Any]) -> Finding:
    return Finding(
        kind=FindingKind(data["kind"]),
        severity=Severity(data["severity"]),
        description=data.get("description", ""),
        sop_instance_uid=data.get("sop_instance_uid"),
        region=_region_from(data.get("region")),
    )


def _measurement_from(data: dict[str, Any]) -> Measurement:
    return Measurement(
        name=data["name"],
        value=float(data["value"]),
        unit=data["unit"],
        description=data.get("description", ""),
        sop_instance_uid=data.get("sop_instance_uid"),
        region=_region_from(data.get("region")),
    )
