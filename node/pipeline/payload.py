"""What travels with a task: prepared slices and the assessed slices' headers.

GPU and I/O workers may run on hosts without the spool, so a task carries everything
it needs (PS3.10 header bytes without pixel data; the prepared slices compressed by
:meth:`inference.prepare.PreparedSeries.to_bytes`), base64 in the JSON message.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom import Dataset

from node.config import Settings

MAX_HEADER_BYTES = 256 * 1024  # one header without pixel data: far below this
#: Hashing the weights of a 4B model from a slow disk can take a while.
ENGINE_KEY_TIMEOUT = 600.0


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
    """The engine part of the job key: the engine's own ``EngineInfo.key``.

    Physics is torch-free and asked in process. The VLM's key (model and adapter
    revisions from the model card, else a hash of the weight files) is computed by the
    real :class:`~inference.vlm.VlmEngine` in a short-lived child process, so the
    listener's process never imports torch; the model itself is not loaded.
    """
    cfg = settings.engine
    if cfg.name == "physics":
        from inference.engine import create_engine

        return create_engine("physics").info.key
    cmd = [sys.executable, "-c", _VLM_KEY_SCRIPT, str(cfg.model or ""),
           str(cfg.adapter or "")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=ENGINE_KEY_TIMEOUT,
                         check=False)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cannot identify the vlm engine: {last}")
    return run.stdout.strip().splitlines()[-1]


_VLM_KEY_SCRIPT = """
import sys
from pathlib import Path
from inference.engine import create_engine
model, adapter = sys.argv[1], sys.argv[2]
engine = create_engine("vlm", model=Path(model), adapter=Path(adapter) if adapter else None,
                       device="cpu")
print(engine.info.key)
"""


def job_key(series_uid: str, generation: int, engine: str) -> str:
    """The idempotency key of a job: one SR per (series, generation, engine + model)."""
    return f"{series_uid}|g{generation}|{engine}"
