"""The physics engine (placeholder until the measurements land in the next commit)."""

from __future__ import annotations

from inference.prepare import PreparedSeries
from inference.result import AssessmentResult, EngineInfo

ENGINE_VERSION = "0.1.0"


class PhysicsEngine:
    """Classical CT quality measures → 0–4 score (not implemented yet)."""

    @property
    def info(self) -> EngineInfo:
        """Name and version."""
        return EngineInfo(name="physics", version=ENGINE_VERSION)

    def assess(self, series: PreparedSeries) -> AssessmentResult:
        """Not implemented yet."""
        raise NotImplementedError("physics engine measurements are not implemented yet")
