"""Classical CT image-quality measures on one slice in HU (no phantom needed).

* Global noise level (Christianson et al., AJR 2015): local-SD map with a square kernel
  of :data:`NOISE_KERNEL_MM`, restricted to pixels whose local mean is soft tissue
  (0–150 HU) or fat (−300–0 HU); the noise is the mode of the SD histogram.
* Streak/metal artifact index: sqrt(SD_artifact² − SD_reference²) in an annulus around
  dense material (> 2000 HU), SD_reference being the slice's global noise.
* Sharpness at the skin–air edge (after Sanders, Ding, Samei, Med Phys 2016): radial
  edge-spread profiles across the body outline, aligned and averaged; 10–90 % edge width
  in mm and the MTF50 of the Gaussian edge with that width.
* Contrast in HU between soft tissue and fat, and CNR = contrast / noise.

A slice may come from a windowed raster (LDCTIQA's PNG/TIFF: W350/L40), whose grey values
only cover ``hu_range`` = [−135, 215] HU: air reads as the floor, bone and metal as the
ceiling. The measures then use what such an image still shows: the body is what lies
above the floor, dense material is what sits at the ceiling (bone and metal alike, the
window cannot tell them apart), streaks are measured in the soft tissue (0–150 HU)
around it (the step from bone to tissue would otherwise read as streaks; values beyond
the window are clipped, so the index reads lower than on the scanner's HU), and the
skin–air edge is not measured (its rise from −1000 HU is cut off at the floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NOISE_KERNEL_MM = 6.0
SOFT_TISSUE_HU = (0.0, 150.0)
FAT_HU = (-300.0, 0.0)
DENSE_HU = 2000.0
BODY_HU = -500.0
#: Pixels within this many HU of a windowed image's floor or ceiling count as clipped.
CLIP_TOLERANCE_HU = 0.5
MIN_DENSE_PIXELS = 4
STREAK_ANNULUS_MM = (4.0, 40.0)
EDGE_RAYS = 90
CORRELATION_LAGS = 4
#: 10–90 % width of a Gaussian edge = 2.563 σ; MTF50 of that edge = 0.1874 / σ.
_WIDTH_PER_SIGMA = 2.5631
_F50_TIMES_SIGMA = math.sqrt(math.log(2) / (2 * math.pi**2))

Box = tuple[float, float, float, float]  # col0, row0, col1, row1
#: (floor, ceiling) HU a windowed image's grey values span; None: unclipped HU.
HuRange = tuple[float, float]


@dataclass(frozen=True)
class NoiseMeasure:
    """Mode of the local-SD histogram in one tissue class, and where it was measured."""

    sd_hu: float | None
    mean_hu: float | None
    pixels: int
    box: Box | None


@dataclass(frozen=True)
class StreakMeasure:
    """Artifact index around dense material; ``box`` encloses the measured annulus."""

    index_hu: float
    dense_pixels: int
    box: Box | None
    #: dense means "at a windowed image's ceiling" (bone or metal), not > 2000 HU
    clipped: bool = False


@dataclass(frozen=True)
class EdgeMeasure:
    """Skin–air edge sharpness (None when no usable edge was found)."""

    width_mm: float | None
    mtf50_per_mm: float | None


@dataclass(frozen=True)
class SliceMeasures:
    """Everything measured on one slice."""

    noise: NoiseMeasure
    fat_noise: NoiseMeasure
    streak: StreakMeasure
    edge: EdgeMeasure
    contrast_hu: float | None
    cnr: float | None


def _kernel(spacing: tuple[float, float]) -> int:
    size = round(NOISE_KERNEL_MM / min(spacing))
    return max(3, size | 1)


def local_stats(hu: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and (biased, 1/n) SD over a size×size box."""
    img = hu.astype(np.float64)
    mean = ndimage.uniform_filter(img, size, mode="nearest")
    sq = ndimage.uniform_filter(img * img, size, mode="nearest")
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))


def box_variance_factor(hu: np.ndarray, mask: np.ndarray, size: int
                        ) -> tuple[float, float]:
    """E[local variance] / σ² for a size×size box, and the box's effective sample count.

    CT noise is spatially correlated (the reconstruction kernel), so the SD of a few
    dozen neighbouring pixels underestimates σ. With ρ(d) the noise autocorrelation,
    E[s²] = σ² (1 − n⁻² Σᵢⱼ ρ(i−j)); ρ is estimated on the residual after a wide local
    mean, in ``mask``, for lags up to :data:`CORRELATION_LAGS` (zero beyond). For white
    noise the factor is the familiar 1 − 1/n.
    """
    residual = hu.astype(np.float64) - ndimage.uniform_filter(
        hu.astype(np.float64), 2 * size + 1, mode="nearest"
    )
    lag = min(CORRELATION_LAGS, size - 1)
    inner = np.zeros_like(mask)
    inner[lag:-lag, lag:-lag] = mask[lag:-lag, lag:-lag]
    rows, cols = np.nonzero(inner)
    if rows.size < 200:
        return 1.0 - 1.0 / (size * size), float(size * size)
    base = residual[rows, cols]
    var0 = float(np.mean(base * base))
    total = 0.0
    for dy in range(-lag, lag + 1):
        for dx in range(-lag, lag + 1):
            rho = 1.0 if dx == dy == 0 else float(
                np.mean(base * residual[rows + dy, cols + dx]) / var0
            )
            total += (size - abs(dx)) * (size - abs(dy)) * rho
    return float(min(max(1.0 - total / size**4, 0.05), 1.0)), size**4 / total


def _mode(values: np.ndarray) -> float:
    """Mode of a histogram (bins of 1 % of the median, lightly smoothed)."""
    median = float(np.median(values))
    step = max(median * 0.01, 0.05)
    top = min(float(values.max()), median * 4 + step)
    bins = np.arange(0.0, top + step, step)
    hist, edges = np.histogram(values, bins=bins)
    smooth = ndimage.gaussian_filter1d(hist.astype(np.float64), 3)
    i = int(np.argmax(smooth))
    return float(0.5 * (edges[i] + edges[i + 1]))


def _box(mask: np.ndarray) -> Box | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))


def tissue_mask(mean: np.ndarray, hu_range: tuple[float, float], core: np.ndarray
                ) -> np.ndarray:
    """Pixels inside ``core`` whose local mean lies within ``hu_range``."""
    mask: np.ndarray = (mean > hu_range[0]) & (mean < hu_range[1]) & core
    return mask


def tissue_noise(mean: np.ndarray, sd: np.ndarray, mask: np.ndarray, factor: float
                 ) -> NoiseMeasure:
    """Christianson noise: mode of the local SD in ``mask`` / sqrt(``factor``)."""
    count = int(mask.sum())
    if count < 200:
        return NoiseMeasure(None, None, count, None)
    sd_hu = _mode(sd[mask]) / math.sqrt(factor)
    return NoiseMeasure(sd_hu, float(mean[mask].mean()), count, _box(mask))


def body_threshold(hu_range: HuRange | None) -> float:
    """HU above which a pixel belongs to the body: −500, or just above the floor of a
    windowed image whose floor lies higher (there, air reads as the floor)."""
    if hu_range is None or hu_range[0] + CLIP_TOLERANCE_HU < BODY_HU:
        return BODY_HU
    return hu_range[0] + CLIP_TOLERANCE_HU


def dense_threshold(hu_range: HuRange | None) -> float:
    """HU above which material is dense: 2000, or just below the ceiling of a windowed
    image whose ceiling lies lower (there, bone and metal both read as the ceiling)."""
    if hu_range is None or hu_range[1] - CLIP_TOLERANCE_HU > DENSE_HU:
        return DENSE_HU
    return hu_range[1] - CLIP_TOLERANCE_HU


def body_mask(hu: np.ndarray, hu_range: HuRange | None = None) -> np.ndarray:
    """The largest connected region above :func:`body_threshold`, holes filled."""
    labels, n = ndimage.label(hu > body_threshold(hu_range))
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones_like(hu), labels, index=np.arange(1, n + 1))
    body: np.ndarray = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    return body


def streak_index(hu: np.ndarray, mean: np.ndarray, body: np.ndarray, ref_sd: float | None,
                 spacing: tuple[float, float], hu_range: HuRange | None = None
                 ) -> StreakMeasure:
    """sqrt(SD² − SD_ref²) of tissue in an annulus around dense material (0 without)."""
    threshold = dense_threshold(hu_range)
    clipped = threshold < DENSE_HU
    dense = hu > threshold
    count = int(dense.sum())
    if count < MIN_DENSE_PIXELS or ref_sd is None:
        return StreakMeasure(0.0, count, None, clipped)
    distance = ndimage.distance_transform_edt(~dense) * min(spacing)
    near, far = STREAK_ANNULUS_MM
    annulus = (distance > near) & (distance < far) & body
    if clipped:
        # bone sits at the ceiling too: only soft tissue around it, so that the step from
        # bone to tissue does not read as streaks; the window has bounded the values
        tissue = annulus & (mean > SOFT_TISSUE_HU[0]) & (mean < SOFT_TISSUE_HU[1])
    else:
        tissue = annulus & (mean > -200.0) & (mean < 300.0)
    if tissue.sum() < 100:
        return StreakMeasure(0.0, count, _box(dense), clipped)
    values = hu[tissue]
    if clipped:
        sd_art = float(values.std())
    else:
        lo, hi = np.percentile(values, [2, 98])
        trimmed = values[(values >= lo) & (values <= hi)]
        # a 2–98 % trimmed SD of a normal sample is 0.88 σ; undo the trim
        sd_art = float(trimmed.std()) / 0.88
    index = math.sqrt(max(sd_art**2 - ref_sd**2, 0.0))
    return StreakMeasure(index, count, _box(annulus), clipped)


def edge_sharpness(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float]
                   ) -> EdgeMeasure:
    """Skin–air edge spread from radial profiles through the body outline."""
    if body.sum() < 500:
        return EdgeMeasure(None, None)
    cy, cx = ndimage.center_of_mass(body)
    step = 0.25
    samples = np.arange(-8.0, 8.0 + step, step)
    profiles = []
    for angle in np.linspace(0, 2 * math.pi, EDGE_RAYS, endpoint=False):
        dx, dy = math.cos(angle), math.sin(angle)
        radius = _outline_radius(body, cy, cx, dy, dx)
        if radius is None:
            continue
        r = radius + samples
        prof = ndimage.map_coordinates(hu, [cy + r * dy, cx + r * dx], order=1, mode="nearest")
        inside, outside = prof[:8].mean(), prof[-8:].mean()
        if inside - outside < 300:
            continue
        norm = (prof - outside) / (inside - outside)
        crossing = np.nonzero(norm[:-1] >= 0.5)[0]
        if crossing.size == 0:
            continue
        shift = (int(crossing[-1]) - samples.size // 2) * step
        profiles.append(np.interp(samples, samples - shift, norm))
    if len(profiles) < 8:
        return EdgeMeasure(None, None)
    esf = np.median(np.stack(profiles), axis=0)[::-1]  # rising from air to tissue
    width_px = _rise_distance(samples, esf)
    if width_px is None:
        return EdgeMeasure(None, None)
    pixel = float(np.mean(spacing))
    width_mm = width_px * pixel
    return EdgeMeasure(width_mm, _F50_TIMES_SIGMA / (width_mm / _WIDTH_PER_SIGMA))


def _outline_radius(body: np.ndarray, cy: float, cx: float, dy: float, dx: float
                    ) -> float | None:
    r = np.arange(0.0, float(max(body.shape)), 1.0)
    rows = np.rint(cy + r * dy).astype(int)
    cols = np.rint(cx + r * dx).astype(int)
    valid = (rows >= 0) & (rows < body.shape[0]) & (cols >= 0) & (cols < body.shape[1])
    inside = np.zeros(r.size, dtype=bool)
    inside[valid] = body[rows[valid], cols[valid]]
    outside = np.nonzero(~inside)[0]
    if outside.size == 0 or not valid[min(int(outside[0]) + 8, r.size - 1)]:
        return None  # body touches the field edge: truncated, no skin-air edge
    return float(outside[0]) - 0.5


def _rise_distance(x: np.ndarray, esf: np.ndarray) -> float | None:
    smooth = ndimage.gaussian_filter1d(esf, 1.0)
    lo = np.nonzero(smooth >= 0.1)[0]
    hi = np.nonzero(smooth >= 0.9)[0]
    if lo.size == 0 or hi.size == 0:
        return None
    width = float(x[hi[0]] - x[lo[0]])
    return width if width > 0 else None


def measure_slice(hu: np.ndarray, spacing: tuple[float, float],
                  hu_range: HuRange | None = None) -> SliceMeasures:
    """All measures for one HU slice with ``spacing`` (row, column) in mm; ``hu_range``
    for a windowed image (see the module doc)."""
    size = _kernel(spacing)
    mean, sd = local_stats(hu, size)
    body = body_mask(hu, hu_range)
    core = ndimage.binary_erosion(body, iterations=size) if body.any() else body
    soft = tissue_mask(mean, SOFT_TISSUE_HU, core)
    factor, n_eff = 1.0 - 1.0 / (size * size), float(size * size)
    if soft.sum() >= 200:
        # estimate the correlation where the tissue is homogeneous on a wider scale
        _, sd_wide = local_stats(hu, 2 * size + 1)
        homogeneous = soft & (sd_wide < 1.2 * _mode(sd_wide[soft]))
        factor, n_eff = box_variance_factor(hu, homogeneous, size)
    # the histogram's mode of a chi-distributed SD lies below its RMS: sqrt((ν−1)/ν)
    nu = max(n_eff - 1.0, 2.0)
    factor *= (nu - 1.0) / nu
    noise = tissue_noise(mean, sd, soft, factor)
    fat = tissue_noise(mean, sd, tissue_mask(mean, FAT_HU, core), factor)
    streak = streak_index(hu, mean, body, noise.sd_hu, spacing, hu_range)
    air_clipped = body_threshold(hu_range) > BODY_HU
    edge = EdgeMeasure(None, None) if air_clipped else edge_sharpness(hu, body, spacing)
    contrast = cnr = None
    if noise.mean_hu is not None and fat.mean_hu is not None and noise.sd_hu:
        contrast = noise.mean_hu - fat.mean_hu
        cnr = abs(contrast) / noise.sd_hu
    return SliceMeasures(noise, fat, streak, edge, contrast, cnr)
