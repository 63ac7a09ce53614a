"""``qcnode train explain``: draft explanations for a manifest that has only scores.

Each record's image is measured by the physics engine (noise in HU, streak index,
sharpness, contrast) and the engine's plain-words explanation becomes the draft. With
``--teacher-url`` a teacher model behind an OpenAI-compatible chat-completions endpoint
(on the site's network) is shown the image — the same windowed rendering the VLM is
trained on — and the physics measurements, and asked to describe the image's quality.

The teacher is **never shown the radiologists' score**: :func:`teacher_request` is built
from the image and the measurements only (it has no access to the record), and score
lines in the teacher's answer are dropped, so the explanation describes the image rather
than justifying a number (the published recipe showed the score; we do not).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from inference.card import DEFAULT_CARD
from inference.dataset import Record, load_prepared, load_rgb, read_manifest, write_manifest
from inference.physics import PhysicsEngine
from inference.prepare import Window

log = structlog.get_logger(__name__)

TEACHER_SYSTEM = (
    "You are a radiologist experienced in CT image quality. You describe the technical "
    "quality of CT images precisely and concisely."
)
TEACHER_INSTRUCTION = (
    "Describe the technical and diagnostic quality of this abdominal CT image: noise and "
    "its texture, streak or metal artifacts (where they come from and what they obscure), "
    "beam hardening, motion, sharpness of edges and fine detail, and soft-tissue contrast. "
    "Say how these affect diagnostic use. Write 3 to 6 sentences of plain prose. Do not "
    "give a numerical score or a rating word."
)
_SCORE_LINE = re.compile(r"^\s*(score|rating)\b.*$", re.IGNORECASE | re.MULTILINE)


class TeacherError(RuntimeError):
    """The teacher endpoint failed or answered in an unexpected shape."""


@dataclass(frozen=True)
class Teacher:
    """An OpenAI-compatible chat-completions endpoint (``base_url`` ends in ``/v1``)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0

    def complete(self, payload: dict[str, Any]) -> str:
        """POST ``payload`` to ``/chat/completions``; the first choice's text."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(  # noqa: S310 - the site's configured URL
            url, data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                data = json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise TeacherError(f"teacher {url}: {exc}") from exc
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise TeacherError(f"teacher {url}: no choices[0].message.content in reply") from exc
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)


def png_data_url(rgb: Any) -> str:
    """A ``data:image/png;base64,…`` URL of an H×W×3 uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def teacher_request(model: str, image_url: str, measurements: str | None) -> dict[str, Any]:
    """The chat-completions payload: instruction, measurements, image — and nothing else."""
    text = TEACHER_INSTRUCTION
    if measurements:
        text += "\n\nMeasured on this image by a physics-based tool: " + measurements
    return {
        "model": model, "temperature": 0, "max_tokens": 600,
        "messages": [
            {"role": "system", "content": TEACHER_SYSTEM},
            {"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": image_url}},
            ]},
        ],
    }


def clean_teacher_text(text: str) -> str:
    """Drop score/rating lines a teacher may add anyway; collapse whitespace."""
    return " ".join(_SCORE_LINE.sub("", text).split())


def physics_draft(record: Record, engine: PhysicsEngine) -> str:
    """The physics engine's description of the record's image: its measurements in words,
    without the engine's own score (which must neither contradict the label in a training
    answer nor anchor a teacher)."""
    return engine.describe(load_prepared(record, Window()))


def draft(record: Record, engine: PhysicsEngine, teacher: Teacher | None,
          window: Window) -> str:
    """The explanation for one record (physics; teacher if given). Never reads the score."""
    try:
        measured: str | None = physics_draft(record, engine)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        if teacher is None:
            raise
        log.warning("explain_physics_failed", record=record.id, error=type(exc).__name__)
        measured = None
    if teacher is None:
        return measured or ""
    payload = teacher_request(teacher.model, png_data_url(load_rgb(record, window)), measured)
    return clean_teacher_text(teacher.complete(payload))


def explain_records(
    records: Sequence[Record], teacher: Teacher | None, *, overwrite: bool = False,
    window: Window = DEFAULT_CARD.window,
) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Records with explanations filled in, and the records that failed (with why)."""
    engine = PhysicsEngine()
    out: list[Record] = []
    failed: list[tuple[Record, str]] = []
    for rec in records:
        if rec.explanation and not overwrite:
            out.append(rec)
            continue
        try:
            text = draft(rec, engine, teacher, window)
        except (ValueError, OSError, NotImplementedError, RuntimeError) as exc:
            failed.append((rec, f"{type(exc).__name__}: {exc}"))
            out.append(rec)
            continue
        out.append(replace(rec, explanation=text or None))
    return out, failed


def main(ns: argparse.Namespace) -> int:
    """``qcnode train explain MANIFEST OUT`` handler."""
    teacher = None
    if ns.teacher_url:
        if not ns.teacher_model:
            print("error: --teacher-url needs --teacher-model", file=sys.stderr)
            return 2
        key = os.environ.get(ns.teacher_key_env) if ns.teacher_key_env else None
        teacher = Teacher(ns.teacher_url, ns.teacher_model, key, ns.timeout)
    try:
        records = read_manifest(ns.manifest, check_images=True)
        done, failed = explain_records(records, teacher, overwrite=ns.overwrite,
                                       window=DEFAULT_CARD.window)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_manifest(ns.out, done)
    for rec, why in failed:
        print(f"{ns.manifest}: line {rec.line} ({rec.id}): {why}", file=sys.stderr)
    source = "teacher + physics" if teacher else "physics"
    print(f"{ns.out}: {len(done) - len(failed)} of {len(done)} record(s) explained ({source})")
    return 1 if failed else 0

