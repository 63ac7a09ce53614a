"""Slice selection and rendering: a CT series → K windowed slices for an engine.

CPU only and torch-free: the listener host prepares, GPU workers receive the result as
compact bytes (:meth:`PreparedSeries.to_bytes`). Slices are sorted along the slice
normal; K are chosen half evenly over the body's z-range, half as the worst by a cheap
screen (:mod:`inference.screen`) over at most :data:`SCREEN_MAX` candidate slices, so a
300-slice series costs only its headers plus a few dozen decodes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from inference.dicom import (
    CT_SOP_CLASSES,
    FrameRef,
    Header,
    NotAnImageError,
    PrepareError,
    iter_files,
    parse_header,
    read_hu,
)
from inference.result import slice_reference
from inference.screen import Screen, screen

__all__ = [
    "MULTI_WINDOWS",
    "PrepareError",
    "PreparedSeries",
    "PreparedSlice",
    "Scan",
    "Window",
    "group_series",
    "prepare_series",
    "scan",
    "scan_series",
]

#: At most this many candidate slices are decoded and screened per series.
SCREEN_MAX = 48
#: Upper bounds that keep a prepared series a reasonable task payload.
MAX_SLICES = 64
MAX_PAYLOAD_BYTES = 48 * 1024 * 1024
MIN_SLICES = 2
#: The multi-window RGB mode (Google's MedGemma CT notebook): R, G, B ranges in HU.
MULTI_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
_FORMAT = "qcnode-prepared/1"


@dataclass(frozen=True)
class Window:
    """Display window in HU; ``mode="multi"`` ignores centre/width and uses MULTI_WINDOWS."""

    center: float = 40.0
    width: float = 350.0
    mode: Literal["single", "multi"] = "single"

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"window width must be positive, got {self.width}")
        if self.mode not in ("single", "multi"):
            raise ValueError(f"window mode must be 'single' or 'multi', got {self.mode!r}")

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Render HU as uint8 H×W×3 (PS3.3 C.11.2.1.2 linear VOI, per channel in multi)."""
        if self.mode == "multi":
            channels = [_ramp(hu, low, high) for low, high in MULTI_WINDOWS]
            return np.stack(channels, axis=-1)
        low = self.center - self.width / 2.0
        gray = _ramp(hu, low, low + self.width)
        rgb: np.ndarray = np.repeat(gray[..., None], 3, axis=-1)
        return rgb


def _ramp(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (hu.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    out: np.ndarray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class PreparedSlice:
    """One selected image plane: HU, geometry and the rendered RGB image.

    ``frame`` is the 1-based frame number of a multi-frame instance, else None;
    ``index`` is the 0-based position of the plane in the series sorted along the normal
    (internal: never shown to people); ``instance_number`` is the image's Instance Number
    (0020,0013), the number a viewer shows, and the one every text names a slice by
    (:func:`inference.result.slice_reference`); ``hu_range`` is the (floor, ceiling) HU
    of a windowed raster whose ``hu`` was reconstructed from grey values (values at
    either end were clipped), None for DICOM.
    """

    sop_instance_uid: str
    frame: int | None
    z: float
    hu: np.ndarray
    pixel_spacing: tuple[float, float]
    rgb: np.ndarray
    index: int = 0
    instance_number: int | None = None
    hu_range: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        """How texts name this plane: ``slice 11`` (its Instance Number), ``image 4
        frame 12`` in a multi-frame instance; by position along the normal without one."""
        return slice_reference(self.instance_number, self.frame) or f"slice at {self.z:.1f} mm"


@dataclass(frozen=True)
class PreparedSeries:
    """The selected slices of one series, ready for an engine."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    slices: tuple[PreparedSlice, ...]
    total_slices: int
    window: Window = field(default_factory=Window)
    #: What an engine should report beside its result (e.g. assumed pixel spacing).
    notes: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        """Compressed (deflate) payload: HU as int16, RGB as uint8, metadata as JSON.

        Raises ValueError above :data:`MAX_PAYLOAD_BYTES` or :data:`MAX_SLICES`.
        """
        if len(self.slices) > MAX_SLICES:
            raise ValueError(f"{len(self.slices)} slices exceed the limit of {MAX_SLICES}")
        meta = {
            "format": _FORMAT,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "series_description": self.series_description,
            "total_slices": self.total_slices,
            "window": [self.window.center, self.window.width, self.window.mode],
            "notes": list(self.notes),
            "slices": [
                [s.sop_instance_uid, s.frame, s.z, list(s.pixel_spacing), s.index,
                 s.instance_number]
                for s in self.slices
            ],
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        }
        for i, s in enumerate(self.slices):
            arrays[f"hu{i}"] = np.clip(np.rint(s.hu), -32768, 32767).astype(np.int16)
            arrays[f"rgb{i}"] = np.ascontiguousarray(s.rgb, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, allow_pickle=False, **arrays)
        data = buffer.getvalue()
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"prepared series is {len(data)} bytes, above the {MAX_PAYLOAD_BYTES} limit"
            )
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> PreparedSeries:
        """Inverse of :meth:`to_bytes` (HU come back rounded to whole HU)."""
        if len(data) > MAX_PAYLOAD_BYTES:
            raise ValueError("prepared-series payload too large")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode())
            if meta.get("format") != _FORMAT:
                raise ValueError(f"unknown prepared-series format {meta.get('format')!r}")
            slices = tuple(
                PreparedSlice(
                    sop_instance_uid=uid, frame=frame, z=float(z),
                    hu=npz[f"hu{i}"].astype(np.float32),
                    pixel_spacing=(float(spacing[0]), float(spacing[1])),
                    rgb=npz[f"rgb{i}"], index=int(index),
                    # payloads written before the Instance Number was carried have 5 fields
                    instance_number=number[0] if number else None,
                )
                for i, (uid, frame, z, spacing, index, *number) in enumerate(meta["slices"])
            )
        center, width, mode = meta["window"]
        return cls(
            study_instance_uid=meta["study_instance_uid"],
            series_instance_uid=meta["series_instance_uid"],
            modality=meta["modality"],
            series_description=meta["series_description"],
            slices=slices, total_slices=int(meta["total_slices"]),
            window=Window(float(center), float(width), mode),
            notes=tuple(meta.get("notes", ())),
        )


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` found: headers by series UID, and each skipped file with why."""

    series: dict[str, list[Header]]
    skipped: tuple[tuple[Path, str], ...]


def scan(paths: Sequence[Path]) -> Scan:
    """Files/folders → series UID → parsed headers, plus the files that are not DICOM
    image instances (with the reason), so a caller can report them."""
    groups: dict[str, list[Header]] = {}
    skipped: list[tuple[Path, str]] = []
    for path in iter_files(paths):
        try:
            header = parse_header(path)
        except NotAnImageError as exc:
            skipped.append((path, str(exc)))
            continue
        groups.setdefault(header.series_instance_uid, []).append(header)
    return Scan(groups, tuple(skipped))


def scan_series(paths: Sequence[Path]) -> dict[str, list[Header]]:
    """Files/folders → series UID → parsed headers (non-image files are left out)."""
    return scan(paths).series


def group_series(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Files/folders → series UID → files, in the order found."""
    return {uid: [h.path for h in hs] for uid, hs in scan_series(paths).items()}


def prepare_series(
    paths: Sequence[Path] | Sequence[Header], k: int = 8, window: Window = Window()
) -> PreparedSeries:
    """Read one CT series, select ``k`` planes and render them with ``window``.

    Raises :class:`PrepareError` (one-line message) for non-CT input, several series,
    fewer than :data:`MIN_SLICES` planes or undecodable pixel data.
    """
    if not 1 <= k <= MAX_SLICES:
        raise PrepareError(f"k must be between 1 and {MAX_SLICES}, got {k}")
    headers = _headers(paths)
    first = _check_series(headers)
    planes = sorted(
        (f for h in headers for f in h.frames if not f.localizer),
        key=lambda f: (f.z, f.sop_instance_uid, f.frame or 0),
    )
    if len(planes) < MIN_SLICES:
        raise PrepareError(
            f"series {first.series_instance_uid} has {len(planes)} image plane(s); "
            f"at least {MIN_SLICES} are needed"
        )
    chosen = _select(planes, k)
    slices = tuple(
        PreparedSlice(
            sop_instance_uid=ref.sop_instance_uid, frame=ref.frame, z=ref.z, hu=hu,
            pixel_spacing=ref.pixel_spacing, rgb=window.apply(hu), index=index,
            instance_number=ref.instance_number,
        )
        for index, ref, hu in chosen
    )
    return PreparedSeries(
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        modality=first.modality,
        series_description=first.series_description,
        slices=slices, total_slices=len(planes), window=window,
        notes=_spacing_notes([ref for _, ref, _ in chosen]),
    )


def _spacing_notes(refs: Sequence[FrameRef]) -> tuple[str, ...]:
    """A note when assessed planes lack a valid Pixel Spacing (PS3.3 C.7.6.2, Type 1)."""
    missing = sum(not ref.spacing_known for ref in refs)
    if not missing:
        return ()
    return (f"Pixel Spacing missing or invalid on {missing} of {len(refs)} assessed "
            "image(s): distances assume 1 mm per pixel, so edge width and MTF50 are "
            "in pixel units there",)


def _headers(paths: Sequence[Path] | Sequence[Header]) -> list[Header]:
    headers: list[Header] = []
    files: list[Path] = []
    for item in paths:
        if isinstance(item, Header):
            headers.append(item)
        else:
            files.append(Path(item))
    for uid, group in scan_series(files).items():
        del uid
        headers.extend(group)
    if not headers:
        raise PrepareError("no DICOM image instances found")
    return headers


def _check_series(headers: list[Header]) -> Header:
    first = headers[0]
    uids = {h.series_instance_uid for h in headers}
    if len(uids) > 1:
        raise PrepareError(f"{len(uids)} series given where one was expected")
    for h in headers:
        if h.modality != "CT" or h.sop_class_uid not in CT_SOP_CLASSES:
            raise PrepareError(
                f"series {h.series_instance_uid} is not CT (modality {h.modality or '?'}, "
                f"SOP class {h.sop_class_uid or '?'}); only CT series can be assessed"
            )
    return first


def _select(planes: list[FrameRef], k: int) -> list[tuple[int, FrameRef, np.ndarray]]:
    """Pick ``k`` planes: evenly over the body's z-range, then the worst by the screen."""
    n = len(planes)
    candidates = sorted({round(x) for x in np.linspace(0, n - 1, min(n, SCREEN_MAX))})
    decoded = {i: read_hu(planes[i]) for i in candidates}
    if k >= len(candidates):
        return [(i, planes[i], decoded[i]) for i in candidates]
    screens: dict[int, Screen] = {i: screen(decoded[i]) for i in candidates}
    top = max(s.body_fraction for s in screens.values())
    body = [i for i in candidates if screens[i].body_fraction >= 0.3 * top] or candidates
    n_even = min(len(body), max(1, math.ceil(k / 2)))
    picks = {body[round(x)] for x in np.linspace(0, len(body) - 1, n_even)}
    ranked = sorted(candidates, key=lambda i: (-screens[i].badness, i))
    for i in ranked:
        if len(picks) >= k:
            break
        picks.add(i)
    return [(i, planes[i], decoded[i]) for i in sorted(picks)]
