"""Agreement between predicted and radiologist quality scores (LDCTIQA metrics).

SRCC (Spearman), PLCC (Pearson), KROCC (Kendall tau-b, tie-corrected), MAE and RMSE,
each with a seeded percentile-bootstrap 95 % confidence interval, the LDCTIQA 2023
challenge aggregate ``|PLCC| + |SRCC| + |KROCC|`` and a calibration table.

A correlation is undefined when either side is constant (all predictions equal, or all
labels equal). Then the point value is ``None`` and the report carries a plain-words
note; no NaN ever leaves this module. Torch-free: numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats

FloatArray = NDArray[np.float64]
#: Scores as a list/tuple of floats or a 1-D float array.
Scores = Sequence[float] | FloatArray
MetricFn = Callable[[Scores, Scores], float]
CORRELATIONS = ("srcc", "plcc", "krocc")
ERRORS = ("mae", "rmse")
DEFAULT_BOOTSTRAP = 1000
#: The calibration table bins predictions on the 0–4 scale to these integer classes.
SCORE_CLASSES = (0, 1, 2, 3, 4)


class DegenerateInputError(ValueError):
    """A metric is undefined for these inputs (constant side, too few pairs)."""


def _arrays(y_true: Scores, y_pred: Scores) -> tuple[FloatArray, FloatArray]:
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"need two equal-length 1-D sequences, got {t.shape} and {p.shape}")
    if t.size == 0:
        raise DegenerateInputError("no pairs to compare")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
        raise ValueError("scores must be finite numbers (found NaN or infinity)")
    return t, p


def _check_correlatable(t: FloatArray, p: FloatArray) -> None:
    if t.size < 2:
        raise DegenerateInputError("a correlation needs at least 2 pairs")
    if np.ptp(p) == 0:
        raise DegenerateInputError(
            f"the predictions are constant (all {p[0]:g}): a correlation is undefined"
        )
    if np.ptp(t) == 0:
        raise DegenerateInputError(
            f"the reference scores are constant (all {t[0]:g}): a correlation is undefined"
        )


def _pearson(t: FloatArray, p: FloatArray) -> float:
    dt = t - t.mean()
    dp = p - p.mean()
    r = float(np.dot(dt, dp) / math.sqrt(float(np.dot(dt, dt)) * float(np.dot(dp, dp))))
    return max(-1.0, min(1.0, r))


def plcc(y_true: Scores, y_pred: Scores) -> float:
    """Pearson linear correlation coefficient; raises :class:`DegenerateInputError`."""
    t, p = _arrays(y_true, y_pred)
    _check_correlatable(t, p)
    return _pearson(t, p)


def srcc(y_true: Scores, y_pred: Scores) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties get their average rank."""
    t, p = _arrays(y_true, y_pred)
    _check_correlatable(t, p)
    return _pearson(stats.rankdata(t), stats.rankdata(p))


def krocc(y_true: Scores, y_pred: Scores) -> float:
    """Kendall rank correlation, tau-b (corrected for ties on either side)."""
    t, p = _arrays(y_true, y_pred)
    _check_correlatable(t, p)
    return float(stats.kendalltau(t, p, variant="b").statistic)


def mae(y_true: Scores, y_pred: Scores) -> float:
    """Mean absolute error on the 0–4 scale."""
    t, p = _arrays(y_true, y_pred)
    return float(np.mean(np.abs(p - t)))


def rmse(y_true: Scores, y_pred: Scores) -> float:
    """Root mean squared error on the 0–4 scale."""
    t, p = _arrays(y_true, y_pred)
    return float(math.sqrt(float(np.mean((p - t) ** 2))))


METRICS: dict[str, MetricFn] = {
    "srcc": srcc, "plcc": plcc, "krocc": krocc, "mae": mae, "rmse": rmse,
}


@dataclass(frozen=True)
class Estimate:
    """A metric's point value with its bootstrap 95 % interval (None = undefined)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    note: str = ""

    def fmt(self, digits: int = 3) -> str:
        """``0.795 [0.741, 0.838]``, or ``n/a`` with the reason."""
        if self.value is None:
            return f"n/a ({self.note})" if self.note else "n/a"
        text = f"{self.value:.{digits}f}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return text


@dataclass(frozen=True)
class CalibrationRow:
    """Predictions rounded to one score class: how the labels behave there."""

    predicted_class: int
    n: int
    mean_predicted: float | None
    mean_reference: float | None
    mean_error: float | None  # predicted − reference


@dataclass(frozen=True)
class Agreement:
    """Every agreement metric for one set of predictions."""

    n: int
    srcc: Estimate
    plcc: Estimate
    krocc: Estimate
    mae: Estimate
    rmse: Estimate
    aggregate: Estimate  # |PLCC| + |SRCC| + |KROCC| (LDCTIQA 2023)
    calibration: tuple[CalibrationRow, ...]
    bootstrap: int
    seed: int
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _aggregate(t: Scores, p: Scores) -> float:
    return abs(plcc(t, p)) + abs(srcc(t, p)) + abs(krocc(t, p))


def bootstrap_ci(
    y_true: Scores, y_pred: Scores,
    metric: MetricFn,
    *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``metric`` over resampled pairs.

    Resamples on which the metric is undefined (e.g. all predictions equal) are dropped;
    if more than half are dropped the interval is ``None``.
    """
    t, p = _arrays(y_true, y_pred)
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(n_boot):
        idx = rng.integers(0, t.size, t.size)
        try:
            values.append(metric(t[idx], p[idx]))
        except DegenerateInputError:
            continue
    if n_boot == 0 or len(values) < n_boot / 2:
        return None
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return float(low), float(high)


def _estimate(
    t: FloatArray, p: FloatArray,
    metric: MetricFn,
    n_boot: int, seed: int,
) -> Estimate:
    try:
        value = metric(t, p)
    except DegenerateInputError as exc:
        return Estimate(None, note=str(exc))
    ci = bootstrap_ci(t, p, metric, n_boot=n_boot, seed=seed) if n_boot and t.size > 1 else None
    return Estimate(value, *(ci if ci else (None, None)))


def calibration_table(
    y_true: Scores, y_pred: Scores,
) -> tuple[CalibrationRow, ...]:
    """Predictions grouped by their nearest score class (0–4): mean label per class."""
    t, p = _arrays(y_true, y_pred)
    classes = np.clip(np.rint(p), SCORE_CLASSES[0], SCORE_CLASSES[-1]).astype(int)
    rows = []
    for c in SCORE_CLASSES:
        sel = classes == c
        n = int(sel.sum())
        if n == 0:
            rows.append(CalibrationRow(c, 0, None, None, None))
            continue
        mp, mt = float(p[sel].mean()), float(t[sel].mean())
        rows.append(CalibrationRow(c, n, mp, mt, mp - mt))
    return tuple(rows)


def agreement(
    y_true: Scores, y_pred: Scores,
    *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
) -> Agreement:
    """All metrics with bootstrap CIs (same ``seed`` → same intervals)."""
    t, p = _arrays(y_true, y_pred)
    est = {name: _estimate(t, p, fn, n_boot, seed) for name, fn in METRICS.items()}
    agg = _estimate(t, p, _aggregate, n_boot, seed)
    notes = sorted({e.note for e in est.values() if e.note})
    if t.size < 10:
        notes.append(f"only {t.size} pairs: the intervals are very wide")
    return Agreement(
        n=int(t.size), aggregate=agg, calibration=calibration_table(t, p),
        bootstrap=n_boot, seed=seed, notes=tuple(notes), **est,
    )
