"""What travels with a task: prepared slices and the assessed slices' headers.

GPU and I/O workers may run on hosts without the spool, so a task carries everything
it needs (PS3.10 header bytes without pixel data; the prepared slices compressed by
:meth:`inference.prepare.PreparedSeries.to_bytes`), base64 in the JSON message.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom import Dataset

from node.config import Settings

MAX_HEADER_BYTES = 256 * 1024  # one header without pixel data: far below this


def b64(data: bytes) -> str:
    """Base64 text for a JSON message."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Inverse of :func:`b64`."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def header_bytes(path: Path) -> bytes:
    """The DICOM file at ``path`` without its pixel data, as PS3.10 bytes."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    data = buf.getvalue()
    if len(data) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {ds.SOPInstanceUID} is {len(data)} bytes")
    return data


def encode_sources(paths_by_uid: dict[str, Path], uids: Sequence[str]) -> list[str]:
    """Headers of the slices ``uids`` (in that order), base64."""
    return [b64(header_bytes(paths_by_uid[uid])) for uid in dict.fromkeys(uids)]


def decode_sources(encoded: Sequence[str]) -> list[Dataset]:
    """Inverse of :func:`encode_sources`."""
    return [pydicom.dcmread(io.BytesIO(unb64(text)), force=True) for text in encoded]


def engine_key(settings: Settings) -> str:
    """The engine part of the job key, computed without importing torch.

    Physics: its ``EngineInfo.key``. VLM: name + model and adapter directory names (the
    SR's algorithm identification carries the exact revisions from the engine itself).
    """
    cfg = settings.engine
    if cfg.name == "physics":
        from inference.engine import create_engine

        return create_engine("physics").info.key
    adapter = cfg.adapter.name if cfg.adapter is not None else "-"
    model = cfg.model.name if cfg.model is not None else "-"
    return f"vlm:{model}:{adapter}"


def job_key(series_uid: str, generation: int, engine: str) -> str:
    """The idempotency key of a job: one SR per (series, generation, engine + model)."""
    return f"{series_uid}|g{generation}|{engine}"
