"""Labelled image-quality datasets: a JSONL manifest, one record per image.

Each line is a JSON object::

    {"image": "train/0001.tif", "score": 2.4, "explanation": "…", "split": "train",
     "id": "0001", "window": {"center": 40, "width": 350}, "frame": null, "group": null}

- ``image`` (required): a DICOM CT instance, a PNG or a TIFF, relative to the manifest's
  folder or absolute (a folder holding one DICOM series is accepted for evaluation).
  DICOM goes through the same Modality LUT (PS3.3 C.11.1) and display window as
  inference (:meth:`inference.prepare.Window.apply`, with the model card's window);
  PNG/TIFF are taken as already windowed grey images (TIFF floats in [0, 1],
  as LDCTIQA ships them; PNG 0–255).
- ``score`` (required): the radiologists' score on the 0–4 scale, decimals allowed.
- ``explanation``, ``split`` (e.g. ``train``/``val``/``test``), ``id`` (default: the
  image's file stem), ``frame`` (1-based, multi-frame DICOM), ``group`` (records of one
  series share it, so splits never cut a series) are optional.
- ``window`` (PNG/TIFF only, optional): the HU window the grey image was rendered with,
  so that engines needing HU (physics) can approximately undo it.

:func:`validate_manifest` reports every bad record with its line number. Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from inference.dicom import FrameRef, Header, parse_header, read_hu
from inference.prepare import PreparedSeries, PreparedSlice, Window, prepare_series
from inference.result import SCORE_MAX, SCORE_MIN

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ""})
RASTER_SUFFIXES = frozenset({".png", ".tif", ".tiff"})
#: Pixel spacing assumed for PNG/TIFF records (LDCTIQA slices are ~0.7 mm).
RASTER_SPACING_MM = (0.7, 0.7)
_KNOWN_KEYS = frozenset(
    {"image", "score", "explanation", "split", "id", "window", "frame", "group"}
)


@dataclass(frozen=True)
class Record:
    """One labelled image of a manifest (``line`` is 1-based; 0 when built in code)."""

    image: Path
    score: float
    id: str
    explanation: str | None = None
    split: str | None = None
    frame: int | None = None
    group: str | None = None
    window: tuple[float, float] | None = None  # (center, width) of a PNG/TIFF
    line: int = 0

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """The manifest line; ``image`` relative to ``base`` when it lies below it."""
        image = self.image
        if base is not None and image.is_absolute():
            with contextlib.suppress(ValueError):
                image = image.relative_to(base.resolve())
        data: dict[str, Any] = {"id": self.id, "image": str(image), "score": self.score}
        for key in ("explanation", "split", "frame", "group"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.window is not None:
            data["window"] = {"center": self.window[0], "width": self.window[1]}
        return data


@dataclass(frozen=True)
class Problem:
    """A bad manifest record: where, which, what."""

    line: int
    message: str
    id: str | None = None

    def __str__(self) -> str:
        who = f" ({self.id})" if self.id else ""
        return f"line {self.line}{who}: {self.message}"


class ManifestError(ValueError):
    """A manifest has bad records; ``problems`` lists every one of them."""

    def __init__(self, path: Path, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} bad record(s)\n{lines}")


def is_dicom(path: Path) -> bool:
    """True unless the suffix says PNG/TIFF (DICOM files often have no suffix)."""
    return path.suffix.lower() not in RASTER_SUFFIXES


def _parse_line(text: str, line: int, base: Path) -> Record:
    """One manifest line → Record; ValueError with a one-line message if malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ValueError("a record must be a JSON object")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    if not isinstance(data.get("image"), str) or not data["image"]:
        raise ValueError("missing 'image' (path of a DICOM, PNG or TIFF file)")
    score = data.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise ValueError(f"missing or non-numeric 'score' ({score!r})")
    if not SCORE_MIN <= float(score) <= SCORE_MAX:
        raise ValueError(f"score {score} is outside the 0–4 scale")
    image = Path(data["image"])
    image = image if image.is_absolute() else (base / image)
    window = data.get("window")
    frame = data.get("frame")
    if frame is not None and (not isinstance(frame, int) or frame < 1):
        raise ValueError(f"'frame' must be a 1-based integer, got {frame!r}")
    return Record(
        image=image.resolve(), score=float(score),
        id=str(data.get("id") or image.stem), explanation=_opt_str(data, "explanation"),
        split=_opt_str(data, "split"), frame=frame, group=_opt_str(data, "group"),
        window=None if window is None else (float(window["center"]), float(window["width"])),
        line=line,
    )


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{key}' must be text, got {type(value).__name__}")
    return value


def _scan(path: Path) -> tuple[list[Record], list[Problem]]:
    records: list[Record] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    base = path.resolve().parent
    with path.open(encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = _parse_line(text, number, base)
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(Problem(number, str(exc)))
                continue
            if rec.id in seen:
                first = f"duplicate id (first on line {seen[rec.id]})"
                problems.append(Problem(number, first, rec.id))
                continue
            seen[rec.id] = number
            records.append(rec)
    return records, problems


def image_problem(record: Record) -> str | None:
    """Why ``record``'s image cannot be used, or None when it loads."""
    if record.image.is_dir():
        return _series_problem(record.image)
    if not record.image.is_file():
        return f"missing file {record.image}"
    try:
        load_hu_or_gray(record)
    except (OSError, ValueError) as exc:
        return f"unreadable image {record.image.name}: {exc}"
    return None


def _series_problem(folder: Path) -> str | None:
    from inference.prepare import group_series

    try:
        found = len(group_series([folder]))
    except ValueError as exc:
        return f"unreadable series folder {folder.name}: {exc}"
    return None if found == 1 else f"folder {folder.name} holds {found} DICOM series, not 1"


def validate_manifest(
    path: Path, *, check_images: bool = True
) -> tuple[list[Record], list[Problem]]:
    """Every record that is fine, and every problem (line order)."""
    records, problems = _scan(path)
    good: list[Record] = []
    for rec in records:
        issue = image_problem(rec) if check_images else None
        if issue:
            problems.append(Problem(rec.line, issue, rec.id))
        else:
            good.append(rec)
    problems.sort(key=lambda p: p.line)
    return good, problems


def read_manifest(
    path: Path, *, split: str | None = None, check_images: bool = False
) -> list[Record]:
    """The records (optionally one split); raises :class:`ManifestError` on any bad one."""
    records, problems = validate_manifest(path, check_images=check_images)
    if problems:
        raise ManifestError(path, problems)
    if split is not None:
        records = [r for r in records if r.split == split]
    return records


def write_manifest(path: Path, records: Iterable[Record]) -> int:
    """Write ``records`` as JSONL (image paths relative to the manifest's folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_json(base), ensure_ascii=False) + "\n")
            n += 1
    return n


# Images ---------------------------------------------------------------------------
def _read_raster(path: Path) -> NDArray[np.float32]:
    """A PNG/TIFF as grey values in [0, 1] (float TIFF as stored, integers scaled)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("F", "I;16", "I;16B", "I"):
            arr = np.asarray(img, dtype=np.float32)
            if img.mode != "F":
                arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ValueError(f"expected a 2-D grey image, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def _dicom_plane(record: Record) -> tuple[Header, NDArray[np.float32], FrameRef]:
    """(header, HU, frame ref) of a DICOM record's plane."""
    header = parse_header(record.image)  # NotAnImageError (a ValueError) says why
    if header.modality != "CT" or not header.frames:
        raise ValueError(f"not a CT image (modality {header.modality or '?'})")
    refs = [f for f in header.frames if f.frame == record.frame or record.frame is None]
    if not refs:
        raise ValueError(f"frame {record.frame} not in {len(header.frames)} frame(s)")
    return header, read_hu(refs[0]), refs[0]


def load_hu_or_gray(record: Record) -> NDArray[np.float32]:
    """HU for DICOM, grey [0, 1] for PNG/TIFF; raises ValueError/OSError if unreadable."""
    if is_dicom(record.image):
        return _dicom_plane(record)[1]
    return _read_raster(record.image)


def load_rgb(record: Record, window: Window) -> NDArray[np.uint8]:
    """The H×W×3 uint8 image a VLM sees: DICOM windowed with ``window``, PNG/TIFF grey."""
    if record.image.is_dir():
        raise ValueError(f"record {record.id} is a whole series, not one image")
    if is_dicom(record.image):
        return window.apply(_dicom_plane(record)[1])
    return _gray_rgb(_read_raster(record.image))


def _gray_rgb(gray: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Grey values in [0, 1] as an H×W×3 uint8 image."""
    return np.repeat(np.rint(gray * 255.0).astype(np.uint8)[..., None], 3, axis=-1)


def load_pil(record: Record, window: Window) -> Image.Image:
    """:func:`load_rgb` as an RGB PIL image (what processors take)."""
    return Image.fromarray(load_rgb(record, window), mode="RGB")


def record_uid(record: Record, kind: str) -> str:
    """A stable UID (PS3.5 B.2, ``2.25.`` + UUID) for a non-DICOM record."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'qcnode:{kind}:{record.id}').int}"


def load_prepared(record: Record, window: Window, k: int = 8) -> PreparedSeries:
    """A one-slice :class:`PreparedSeries` of ``record`` for an engine.

    A record whose ``image`` is a folder is a whole DICOM series: ``k`` planes are
    selected as in inference. PNG/TIFF HU are approximated by undoing the record's
    ``window`` (default W350/L40); values clipped by that window stay clipped.
    """
    if record.image.is_dir():
        return prepare_series([record.image], k=k, window=window)
    if is_dicom(record.image):
        header, hu, ref = _dicom_plane(record)
        slc = PreparedSlice(
            sop_instance_uid=ref.sop_instance_uid, frame=ref.frame, z=ref.z, hu=hu,
            pixel_spacing=ref.pixel_spacing, rgb=window.apply(hu),
            instance_number=ref.instance_number,
        )
        return PreparedSeries(
            header.study_instance_uid, header.series_instance_uid, header.modality,
            header.series_description, (slc,), 1, window,
        )
    gray = _read_raster(record.image)
    center, width = record.window or (40.0, 350.0)
    hu = (gray * np.float32(width) + np.float32(center - width / 2.0)).astype(np.float32)
    slc = PreparedSlice(record_uid(record, "sop"), None, 0.0, hu, RASTER_SPACING_MM,
                        _gray_rgb(gray), instance_number=1,  # the record's one image
                        hu_range=(center - width / 2.0, center + width / 2.0))
    return PreparedSeries(
        record_uid(record, "study"), record_uid(record, "series"), "CT", record.id,
        (slc,), 1, window,
    )
