"""From measurements to the 0–4 LDCTIQA scale, coded findings and plain words.

The mapping is deliberately simple and fully described by :class:`ScoreThresholds`:

* the base score falls piecewise-linearly with the soft-tissue noise (``noise_knots``:
  noise in HU → score; defaults suit an abdominal scan, where ~10 HU is routine);
* streaks around dense material subtract ``streak_index / streak_penalty_hu`` (at most
  ``max_streak_penalty``);
* a skin–air edge wider than ``blur_width_mm`` subtracts ``(width − limit) / blur_scale_mm``
  (at most ``max_blur_penalty``);
* the result is clipped to [0, 4]. The series score is the mean of the slice scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inference.result import Severity


@dataclass(frozen=True)
class ScoreThresholds:
    """Every number the physics score depends on (change them per protocol)."""

    noise_knots: tuple[tuple[float, float], ...] = (
        (0.0, 4.0), (7.0, 4.0), (12.0, 3.0), (18.0, 2.0), (26.0, 1.0), (40.0, 0.0),
    )
    #: Noise (HU) from which a noise finding is mild / moderate / severe.
    noise_severity_hu: tuple[float, float, float] = (12.0, 18.0, 26.0)
    streak_penalty_hu: float = 25.0
    max_streak_penalty: float = 2.5
    #: Streak index (HU) from which a streak finding is mild / moderate / severe.
    streak_severity_hu: tuple[float, float, float] = (15.0, 30.0, 60.0)
    blur_width_mm: float = 4.0
    blur_scale_mm: float = 1.5
    max_blur_penalty: float = 1.5
    #: Edge width (mm) from which a blur finding is mild / moderate / severe.
    blur_severity_mm: tuple[float, float, float] = (4.0, 5.5, 7.5)
    #: Soft-tissue/fat CNR below which contrast is low: mild / moderate / severe.
    cnr_severity: tuple[float, float, float] = (4.0, 2.5, 1.5)
    #: Relative uncertainty of a noise measurement, and of the mapping itself (score).
    noise_relative_uncertainty: float = 0.05
    model_uncertainty: float = 0.25


DEFAULT_THRESHOLDS = ScoreThresholds()


def noise_score(noise_hu: float, t: ScoreThresholds) -> float:
    """Base score for a soft-tissue noise level (piecewise linear in ``noise_knots``)."""
    xs = [k[0] for k in t.noise_knots]
    ys = [k[1] for k in t.noise_knots]
    return float(np.interp(noise_hu, xs, ys))


def slice_score(noise_hu: float, streak_hu: float, edge_mm: float | None,
                t: ScoreThresholds) -> tuple[float, float]:
    """(score, uncertainty) of one slice from its measurements."""
    base = noise_score(noise_hu, t)
    penalty = min(streak_hu / t.streak_penalty_hu, t.max_streak_penalty)
    if edge_mm is not None and edge_mm > t.blur_width_mm:
        penalty += min((edge_mm - t.blur_width_mm) / t.blur_scale_mm, t.max_blur_penalty)
    score = float(np.clip(base - penalty, 0.0, 4.0))
    delta = noise_hu * t.noise_relative_uncertainty
    slope = abs(noise_score(noise_hu + delta, t) - noise_score(noise_hu - delta, t)) / 2
    return score, math.hypot(slope, 0.1)


def series_score(scores: list[float], uncertainties: list[float], t: ScoreThresholds
                 ) -> tuple[float, float]:
    """Mean slice score and its uncertainty (slice spread, measurement, mapping)."""
    arr = np.asarray(scores)
    spread = float(arr.std() / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    measurement = float(np.mean(uncertainties))
    return float(arr.mean()), math.sqrt(spread**2 + measurement**2 + t.model_uncertainty**2)


def severity(value: float, limits: tuple[float, float, float], *, lower_is_worse: bool = False
             ) -> Severity:
    """NONE/MILD/MODERATE/SEVERE for ``value`` against ascending (or descending) limits."""
    levels = (Severity.MILD, Severity.MODERATE, Severity.SEVERE)
    result = Severity.NONE
    for limit, level in zip(limits, levels, strict=True):
        if (value < limit) if lower_is_worse else (value >= limit):
            result = level
    return result


def noise_words(noise_hu: float, t: ScoreThresholds) -> str:
    """'low', 'acceptable', 'high' or 'very high' for an abdominal scan."""
    mild, _, severe = t.noise_severity_hu
    if noise_hu < t.noise_knots[1][0] + 1:
        return "low for an abdominal scan"
    if noise_hu < mild:
        return "acceptable for an abdominal scan"
    if noise_hu < severe:
        return "high for an abdominal scan"
    return "very high for an abdominal scan"
