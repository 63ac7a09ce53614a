"""Reading CT instances: headers, per-frame geometry and stored values → Hounsfield units.

Handles single-frame CT Image Storage (PS3.3 A.3) and the multi-frame Enhanced CT /
Legacy Converted Enhanced CT IODs (PS3.3 A.38, A.70), whose per-frame geometry and
rescale live in the Shared and Per-Frame Functional Groups (PS3.3 C.7.6.16). Compressed
transfer syntaxes are decoded by pydicom's pixel backends (pylibjpeg, pyjpegls, RLE).
No torch, no networking.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import pixel_array

#: HU given to padding and to anything below air.
AIR_HU = -1024.0

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE}
)


class PrepareError(ValueError):
    """A series cannot be assessed; the message names the problem in one line."""


@dataclass(frozen=True)
class FrameRef:
    """One image plane of a series: a single-frame instance or one frame of a multi-frame.

    ``frame`` is the 1-based frame number (PS3.3 C.7.6.16) or None for single-frame.
    ``z`` is the position along the slice normal (IPP · (row × column direction)).
    """

    path: Path
    frame: int | None
    sop_instance_uid: str
    z: float
    slope: float
    intercept: float
    pixel_spacing: tuple[float, float]  # (1.0, 1.0) when absent: see spacing_known
    padding: tuple[int, int] | None  # stored-value range set to air, inclusive
    localizer: bool
    spacing_known: bool = True
    #: Instance Number (0020,0013), the image number a viewer shows; None when absent.
    instance_number: int | None = None


@dataclass(frozen=True)
class Header:
    """The series-level identity of one file plus its image planes."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    sop_class_uid: str
    frames: tuple[FrameRef, ...]


def iter_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Files named in ``paths``; folders are walked recursively in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise PrepareError(f"{path}: no such file or folder")


class NotAnImageError(ValueError):
    """A file is not a readable DICOM image instance; the message says why in one line."""


def parse_header(path: Path) -> Header:
    """Parse the header of ``path`` (pixel data is not read).

    Raises
    ------
    NotAnImageError
        ``path`` is not DICOM (no PS3.10 preamble), its header cannot be parsed, it lacks
        the Series/SOP Instance UIDs, or it is not an image (no Rows, PS3.3 C.7.6.3).
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise NotAnImageError("not a DICOM file (no PS3.10 preamble or meta header)") from exc
    except (EOFError, OSError, ValueError, KeyError) as exc:
        raise NotAnImageError(f"unreadable DICOM header ({type(exc).__name__}: {exc})"
                              ) from exc
    series = str(ds.get("SeriesInstanceUID", ""))
    sop = str(ds.get("SOPInstanceUID", ""))
    if not series or not sop:
        raise NotAnImageError("no Series Instance UID or SOP Instance UID")
    if "Rows" not in ds:
        raise NotAnImageError(
            f"not an image instance (no Rows; SOP class {ds.get('SOPClassUID', '?')})")
    frames = tuple(_frames(ds, path)) if str(ds.get("Modality", "")) == "CT" else ()
    return Header(
        path=path,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=series,
        modality=str(ds.get("Modality", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        frames=frames,
    )


def read_header(path: Path) -> Header | None:
    """:func:`parse_header`, or None when ``path`` is not a DICOM image instance."""
    try:
        return parse_header(path)
    except NotAnImageError:
        return None


def _floats(value: Any, n: int, default: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return tuple(default)
    return out if len(out) == n else tuple(default)


def _first(ds: Dataset, seq: str) -> Dataset | None:
    items = ds.get(seq)
    return items[0] if items else None


def _group_attr(groups: Sequence[Dataset | None], seq: str, attr: str) -> Any:
    """``attr`` from the first functional group (per-frame, then shared) holding ``seq``."""
    for group in groups:
        if group is None:
            continue
        item = _first(group, seq)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _padding(ds: Dataset) -> tuple[int, int] | None:
    if "PixelPaddingValue" not in ds:
        return None
    low = int(ds.PixelPaddingValue)
    high = int(ds.get("PixelPaddingRangeLimit", low))
    return (min(low, high), max(low, high))


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _frames(ds: Dataset, path: Path) -> Iterator[FrameRef]:
    sop = str(ds.SOPInstanceUID)
    number = instance_number(ds)
    padding = _padding(ds)
    localizer = "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if shared is None and per_frame is None:
        iop = _floats(ds.get("ImageOrientationPatient"), 6, (1, 0, 0, 0, 1, 0))
        fallback = (0.0, 0.0, float(ds.get("InstanceNumber", 0) or 0))
        ipp = _floats(ds.get("ImagePositionPatient"), 3, fallback)
        for index in range(n_frames):
            yield FrameRef(
                path=path, frame=None if n_frames == 1 else index + 1, sop_instance_uid=sop,
                z=float(np.dot(_normal(iop), ipp)),
                slope=float(ds.get("RescaleSlope", 1) or 1),
                intercept=float(ds.get("RescaleIntercept", 0) or 0),
                pixel_spacing=_spacing(ds.get("PixelSpacing")), padding=padding,
                spacing_known=_spacing_valid(ds.get("PixelSpacing")),
                localizer=localizer, instance_number=number,
            )
        return
    for index in range(n_frames):
        frame_group = per_frame[index] if per_frame and index < len(per_frame) else None
        groups = (frame_group, shared)
        iop = _floats(
            _group_attr(groups, "PlaneOrientationSequence", "ImageOrientationPatient"),
            6, (1, 0, 0, 0, 1, 0),
        )
        ipp = _floats(
            _group_attr(groups, "PlanePositionSequence", "ImagePositionPatient"),
            3, (0, 0, float(index)),
        )
        slope = _group_attr(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_attr(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        spacing = _group_attr(groups, "PixelMeasuresSequence", "PixelSpacing")
        yield FrameRef(
            path=path, frame=index + 1, sop_instance_uid=sop,
            z=float(np.dot(_normal(iop), ipp)),
            slope=float(slope if slope is not None else ds.get("RescaleSlope", 1)),
            intercept=float(intercept if intercept is not None else ds.get("RescaleIntercept", 0)),
            pixel_spacing=_spacing(spacing),
            spacing_known=_spacing_valid(spacing),
            padding=padding, localizer=localizer, instance_number=number,
        )


def instance_number(ds: Dataset) -> int | None:
    """Instance Number (0020,0013; Type 2 in the General Image Module, PS3.3 C.7.6.1):
    the number a viewer shows for an image, or None when empty or not an integer."""
    value = ds.get("InstanceNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _spacing_valid(value: Any) -> bool:
    """True when Pixel Spacing (0028,0030) holds two positive numbers."""
    row, col = _floats(value, 2, (0.0, 0.0))
    return row > 0 and col > 0


def _spacing(value: Any) -> tuple[float, float]:
    """Pixel Spacing in mm, or 1 mm per pixel when absent or invalid (the series then
    carries a note saying so: :attr:`FrameRef.spacing_known`)."""
    if not _spacing_valid(value):
        return (1.0, 1.0)
    row, col = _floats(value, 2, (1.0, 1.0))
    return (row, col)


def read_hu(ref: FrameRef) -> np.ndarray:
    """Decode one image plane and convert stored values to HU (float32).

    Modality LUT per PS3.3 C.11.1 (HU = stored × slope + intercept); pixel padding
    (PS3.3 C.7.5.1.1.2) and values below air become -1024 HU.
    """
    try:
        index = None if ref.frame is None else ref.frame - 1
        stored = pixel_array(ref.path, index=index)
    except Exception as exc:  # decoder back ends raise anything
        raise PrepareError(
            f"corrupt or undecodable pixel data in instance {ref.sop_instance_uid}"
            f"{'' if ref.frame is None else f' frame {ref.frame}'}: {exc}"
        ) from exc
    if stored.ndim != 2:
        raise PrepareError(
            f"instance {ref.sop_instance_uid} is not a grey-scale image (shape {stored.shape})"
        )
    hu = stored.astype(np.float32) * np.float32(ref.slope) + np.float32(ref.intercept)
    if ref.padding is not None:
        low, high = ref.padding
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    np.maximum(hu, np.float32(AIR_HU), out=hu)
    return hu
