"""Prepared series of random RGB slices for engine tests (no DICOM files needed)."""

from __future__ import annotations

import numpy as np

from inference.prepare import PreparedSeries, PreparedSlice

UID_ROOT = "1.2.826.0.1.3680043.8.498"


def random_series(n: int, *, seed: int = 0, series: int = 1, size: int = 72) -> PreparedSeries:
    """``n`` slices of random RGB noise; ``series`` keeps UIDs apart between modules."""
    rng = np.random.default_rng(seed)
    slices = tuple(
        PreparedSlice(
            sop_instance_uid=f"{UID_ROOT}.{i + 1}", frame=None, z=2.5 * i,
            hu=np.zeros((size, size), np.float32), pixel_spacing=(0.7, 0.7),
            rgb=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), index=i,
        )
        for i in range(n)
    )
    return PreparedSeries(
        study_instance_uid=f"{UID_ROOT}.{100 * series}",
        series_instance_uid=f"{UID_ROOT}.{100 * series + 1}",
        modality="CT", series_description="", slices=slices, total_slices=n,
    )
