"""A small CT simulator for `qcnode synth`: an elliptical body phantom, analytic
parallel-beam projections, Poisson photon noise on the line integrals and filtered
back-projection of the projection-domain error.

Design (fast enough for tens of 512² slices in seconds, numpy only):

* The phantom is a sum of ellipses (Shepp–Logan style), so its sinogram is analytic
  (exact line integrals, no forward projector).
* Measured counts are Poisson(I0 · dose · e^(−p)) plus a small electronic-noise floor;
  the log-converted error e = p̂ − p (plus a beam-hardening term −κ·p_metal² on rays
  through metal) is reconstructed by FBP (ramp × Hann filter, Kak & Slaney).
* Only the error goes through FBP (FBP is linear): image = blur(phantom) + FBP(e). The
  error is reconstructed on a grid ``decimate`` times coarser than the image (one view
  per grid column over 180°) and band-limited-interpolated up (Fourier zero padding), so
  the noise texture is that of a smooth soft-tissue kernel. The noise-only image is kept:
  its SD in soft tissue is the *simulated noise* that the physics engine must measure.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

#: Linear attenuation of water at ~70 keV, per mm.
MU_WATER_PER_MM = 0.0193
AIR_HU = -1000.0
#: Photons per ray at dose 1.0 (calibrated: ≈10 HU noise in the liver of a 38 cm FOV).
I0_FULL_DOSE = 3.5e5
ELECTRONIC_NOISE = 3.0  # photons (SD), the floor that makes photon starvation visible
BEAM_HARDENING_KAPPA = 0.06  # per unit metal line integral


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in pixel units about the image centre; ``hu`` is added to what is below."""

    x: float
    y: float
    a: float
    b: float
    hu: float
    phi: float = 0.0
    metal: bool = False


def phantom_ellipses(size: int, u: float, metal: bool) -> list[Ellipse]:
    """The body at relative table position ``u`` in [0, 1] (0 = cranial end of the series).

    HU: air −1000, subcutaneous fat −100, muscle/soft tissue 50, liver 60 (upper half),
    kidneys 35, vertebra cortical 700 / cancellous 250, bowel gas −1000, metal 7000.
    """
    r = size / 2.0
    liver = max(0.0, math.cos(math.pi * u * 0.9))  # large cranially, gone caudally
    kidney = max(0.0, math.sin(math.pi * u))
    e = [
        Ellipse(0, 0, 0.80 * r, 0.58 * r, 1000 - 100),  # body: fat over air
        Ellipse(0, 0.02 * r, 0.72 * r, 0.50 * r, 150),  # soft tissue 50 over fat
        Ellipse(0.15 * r, -0.02 * r, 0.14 * r, 0.09 * r, -150),  # mesenteric fat
        Ellipse(0.30 * r, -0.22 * r, 0.06 * r, 0.05 * r, -1050),  # bowel gas
        Ellipse(0, 0.33 * r, 0.10 * r, 0.09 * r, 650),  # vertebra cortex 700
        Ellipse(0, 0.33 * r, 0.075 * r, 0.065 * r, -450),  # cancellous 250
    ]
    if liver > 0.05:
        e.append(Ellipse(-0.32 * r, -0.05 * r, 0.30 * r * liver, 0.26 * r * liver, 10, 0.3))
    if kidney > 0.2:
        for side in (-1, 1):
            e.append(Ellipse(side * 0.30 * r, 0.28 * r, 0.08 * r * kidney, 0.12 * r * kidney,
                             -15, side * 0.4))
    if metal:
        for side in (-1, 1):
            e.append(Ellipse(side * 0.22 * r, 0.30 * r, 0.035 * r, 0.035 * r, 6950, 0, True))
    return e


def metal_centres(size: int) -> list[tuple[float, float]]:
    """Pixel (column, row) centres of the metal inserts made by :func:`phantom_ellipses`."""
    r = size / 2.0
    c = (size - 1) / 2.0
    return [(c + side * 0.22 * r, c + 0.30 * r) for side in (-1, 1)]


def rasterize(ellipses: list[Ellipse], size: int) -> np.ndarray:
    """HU image (2×2 supersampled for partial volume), air outside."""
    sub = 2
    coords = (np.arange(size * sub) + 0.5) / sub - 0.5 - (size - 1) / 2.0
    img = np.full((size * sub, size * sub), AIR_HU, dtype=np.float32)
    for el in ellipses:
        c, s = math.cos(el.phi), math.sin(el.phi)
        x = coords[None, :] - el.x
        y = coords[:, None] - el.y
        inside = ((x * c + y * s) / el.a) ** 2 + ((-x * s + y * c) / el.b) ** 2 <= 1.0
        img[inside] += np.float32(el.hu)
    out: np.ndarray = img.reshape(size, sub, size, sub).mean(axis=(1, 3))
    return out


def sinogram(ellipses: list[Ellipse], geom: Geometry, scale: float, metal: bool) -> np.ndarray:
    """Analytic line integrals (units of attenuation × grid pixel) of the chosen ellipses.

    ``scale`` converts image pixels to grid pixels (1 / decimate).
    """
    theta = geom.angles[:, None]
    det = geom.detector[None, :]
    mu_px = MU_WATER_PER_MM * geom.pixel_mm
    p = np.zeros((geom.views, geom.detector.size))
    for el in ellipses:
        if el.metal != metal:
            continue
        a, b = el.a * scale, el.b * scale
        shift = (el.x * np.cos(theta) + el.y * np.sin(theta)) * scale
        a2 = (a * np.cos(theta - el.phi)) ** 2 + (b * np.sin(theta - el.phi)) ** 2
        s = det - shift
        chord = np.sqrt(np.maximum(a2 - s * s, 0.0))
        p += (el.hu / 1000.0) * mu_px * 2.0 * a * b * chord / a2
    return p


@dataclass(frozen=True)
class Geometry:
    """Parallel-beam geometry on an n×n reconstruction grid of ``pixel_mm`` pixels."""

    n: int
    pixel_mm: float

    @property
    def views(self) -> int:
        """One view per grid column over 180°."""
        return self.n

    @property
    def angles(self) -> np.ndarray:
        """View angles in radians."""
        return np.linspace(0.0, math.pi, self.views, endpoint=False)

    @property
    def detector(self) -> np.ndarray:
        """Detector bin centres in grid pixels (covers the grid's diagonal)."""
        half = math.ceil(self.n * math.sqrt(2) / 2) + 2
        return np.arange(-half, half + 1, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def _backprojection_index(n: int) -> np.ndarray:
    """Flat indices into the 2×-upsampled filtered sinogram for every (view, pixel)."""
    geom = Geometry(n, 1.0)
    coords = (np.arange(n) - (n - 1) / 2.0).astype(np.float32)
    n_up = 2 * geom.detector.size - 1
    origin = -float(geom.detector[0])
    index = np.empty((geom.views, n * n), dtype=np.int32)
    for v, angle in enumerate(geom.angles):
        t = coords[None, :] * np.float32(math.cos(angle)) + coords[:, None] * np.float32(
            math.sin(angle)
        )
        index[v] = np.rint((t.ravel() + origin) * 2).astype(np.int32) + v * n_up
    return index


@functools.lru_cache(maxsize=4)
def _filter(n_det: int) -> np.ndarray:
    """Ram-Lak (spatial-domain definition) × Hann window, in the frequency domain."""
    size = 1 << (2 * n_det - 1).bit_length()
    k = np.concatenate([np.arange(0, size // 2 + 1), np.arange(-size // 2 + 1, 0)])
    h = np.zeros(size)
    h[0] = 0.25
    odd = k % 2 == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    freq = np.fft.rfftfreq(size)
    hann = 0.5 * (1 + np.cos(2 * math.pi * freq))  # 1 at DC, 0 at Nyquist
    out: np.ndarray = np.real(np.fft.rfft(h)) * hann
    return out


def fbp(sino: np.ndarray, n: int) -> np.ndarray:
    """Filtered back-projection of a (views × detectors) sinogram onto an n×n grid."""
    n_det = sino.shape[1]
    filt = _filter(n_det)
    size = 2 * (filt.size - 1)
    q = fft.irfft(fft.rfft(sino, size, axis=1) * filt, size, axis=1)[:, :n_det]
    up = np.empty((sino.shape[0], 2 * n_det - 1), dtype=np.float32)
    up[:, 0::2] = q
    up[:, 1::2] = 0.5 * (q[:, :-1] + q[:, 1:])
    flat = up.ravel()
    index = _backprojection_index(n)
    img = np.zeros(n * n, dtype=np.float32)
    for start in range(0, index.shape[0], 32):
        img += np.take(flat, index[start : start + 32]).sum(axis=0)
    out: np.ndarray = img.reshape(n, n) * np.float32(math.pi / sino.shape[0])
    return out


def upsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (Fourier zero-padding) upsampling by an integer factor."""
    if factor == 1:
        return img
    n = img.shape[0]
    spec = fft.fftshift(fft.fft2(img))
    big = np.zeros((n * factor, n * factor), dtype=complex)
    o = (n * factor - n) // 2
    big[o : o + n, o : o + n] = spec
    out: np.ndarray = np.real(fft.ifft2(fft.ifftshift(big))) * factor * factor
    return out.astype(np.float32)


def simulate_slice(
    size: int, pixel_mm: float, u: float, dose: float, metal: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One slice → (image HU, noise-and-artifact-only image HU), both float32 size×size."""
    decimate = 2 if size >= 384 else 1
    n = size // decimate
    geom = Geometry(n, pixel_mm * decimate)
    ellipses = phantom_ellipses(size, u, metal)
    scale = 1.0 / decimate
    p_body = sinogram(ellipses, geom, scale, metal=False)
    p_metal = sinogram(ellipses, geom, scale, metal=True) if metal else 0.0 * p_body
    p = p_body + p_metal
    expected = I0_FULL_DOSE * dose * np.exp(-p)
    counts = rng.poisson(expected) + rng.normal(0.0, ELECTRONIC_NOISE, p.shape)
    measured = -np.log(np.maximum(counts, 0.5) / (I0_FULL_DOSE * dose))
    error = measured - p - BEAM_HARDENING_KAPPA * p_metal**2
    mu_px = MU_WATER_PER_MM * geom.pixel_mm
    noise = upsample(fbp(error, n) * np.float32(1000.0 / mu_px), decimate)
    clean = ndimage.gaussian_filter(rasterize(ellipses, size), 0.5 * decimate + 0.3)
    return (clean + noise).astype(np.float32), noise
