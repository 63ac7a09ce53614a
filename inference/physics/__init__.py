"""The physics engine: classical CT quality measures → an explained 0–4 score.

Embedded default engine (numpy/scipy, CPU, deterministic): every prepared slice is
measured (:mod:`inference.physics.measures`), scored (:mod:`inference.physics.scoring`)
and the series result is assembled with coded findings, evidence and an explanation
(:mod:`inference.physics.report`).
"""

from __future__ import annotations

from inference.physics.measures import SliceMeasures, measure_slice
from inference.physics.report import Evidence, build_result, describe_measurements, evidence
from inference.physics.scoring import DEFAULT_THRESHOLDS, ScoreThresholds
from inference.prepare import PreparedSeries
from inference.result import AssessmentResult, EngineInfo

ENGINE_NAME = "physics"
ENGINE_VERSION = "1.0.0"

__all__ = [
    "DEFAULT_THRESHOLDS", "Evidence", "PhysicsEngine", "ScoreThresholds", "SliceMeasures",
]


class PhysicsEngine:
    """Noise (Christianson), streak index, skin–air sharpness and contrast → score."""

    def __init__(self, thresholds: ScoreThresholds = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = thresholds

    @property
    def info(self) -> EngineInfo:
        """Name and version; the thresholds are part of the version's meaning."""
        return EngineInfo(name=ENGINE_NAME, version=ENGINE_VERSION)

    def measure(self, series: PreparedSeries) -> list[SliceMeasures]:
        """The measurements of every prepared slice, in slice order."""
        return [measure_slice(s.hu, s.pixel_spacing, s.hu_range) for s in series.slices]

    def assess(self, series: PreparedSeries) -> AssessmentResult:
        """Assess one prepared series (raises ValueError if it has no slices)."""
        if not series.slices:
            raise ValueError(f"series {series.series_instance_uid} has no prepared slices")
        return build_result(series, self.measure(series), self.thresholds, self.info)

    def describe(self, series: PreparedSeries) -> str:
        """The measurements in plain words, without a score (the assessment's explanation
        minus its score sentence); raises ValueError like :meth:`assess`."""
        if not series.slices:
            raise ValueError(f"series {series.series_instance_uid} has no prepared slices")
        return describe_measurements(series, self.measure(series), self.thresholds)

    def evidence(self, series: PreparedSeries) -> Evidence:
        """The measurements of ``series`` in words, findings and evidence items, without a
        score (for another engine's result); raises ValueError like :meth:`assess`."""
        if not series.slices:
            raise ValueError(f"series {series.series_instance_uid} has no prepared slices")
        return evidence(series, self.measure(series), self.thresholds)
