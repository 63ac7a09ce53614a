"""A cheap quality screen used to pick the worst slices before the full physics engine.

It runs on every candidate slice of a series, so it works on a 2× subsampled image
(subsampling, not averaging, keeps the per-pixel noise) and costs a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BODY_HU = -500.0
SOFT_TISSUE_HU = (0.0, 150.0)
DENSE_HU = 2000.0
#: Badness added per 0.01 % of the slice above :data:`DENSE_HU` (metal draws the eye).
DENSE_WEIGHT = 20.0


@dataclass(frozen=True)
class Screen:
    """Cheap per-slice numbers: fraction of the field that is body, and a badness."""

    body_fraction: float
    noise_hu: float
    dense_fraction: float

    @property
    def badness(self) -> float:
        """Higher is worse: quick noise in HU plus a penalty for dense material."""
        return self.noise_hu + DENSE_WEIGHT * min(self.dense_fraction * 1e4, 5.0)


def screen(hu: np.ndarray) -> Screen:
    """Screen one HU slice (any size); deterministic."""
    sub = np.ascontiguousarray(hu[::2, ::2], dtype=np.float32)
    body = sub > BODY_HU
    body_fraction = float(body.mean())
    mean = ndimage.uniform_filter(sub, 3)
    sq = ndimage.uniform_filter(sub * sub, 3)
    sd = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    soft = (mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])
    noise = float(np.median(sd[soft])) if soft.sum() > 50 else 0.0
    return Screen(body_fraction, noise, float((sub > DENSE_HU).mean()))
