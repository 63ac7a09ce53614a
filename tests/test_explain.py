"""``qcnode train explain``: physics drafts, and a real local OpenAI-style teacher that must
never be shown the radiologists' score."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from inference.ctsim import simulate_slice
from inference.dataset import Record, read_manifest
from inference.explain import physics_draft
from inference.physics import PhysicsEngine
from node.cli import main as qcnode
from tests.support.labelled import write_series
from tests.support.net import free_port, wait_port

TEACHER_TEXT = "Moderate noise in the liver; fine streaks from the spine obscure little."
SCORES = (3.8, 1.4, 0.6)


class _Teacher(BaseHTTPRequestHandler):
    """A minimal OpenAI chat-completions server that records every request body."""

    requests: ClassVar[list[dict[str, Any]]] = []
    raw: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        type(self).raw.append(body)
        type(self).requests.append(json.loads(body))
        reply = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "teacher",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"{TEACHER_TEXT}\nScore: 2.0"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        del format, args


@pytest.fixture
def teacher() -> Iterator[str]:
    _Teacher.requests, _Teacher.raw = [], []
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    wait_port(port)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def scores_only(tmp_path: Path) -> Path:
    write_series(tmp_path / "ct", 3, size=96)
    lines = [json.dumps({"image": f"ct/{i:03d}.dcm", "score": s, "split": "train"})
             for i, s in enumerate(SCORES)]
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_teacher_sees_image_and_measurements_but_never_the_score(
    scores_only: Path, teacher: str, tmp_path: Path
) -> None:
    out = tmp_path / "explained.jsonl"
    rc = qcnode(["train", "explain", str(scores_only), str(out), "--teacher-url", teacher,
                 "--teacher-model", "teacher"])
    assert rc == 0
    assert len(_Teacher.requests) == len(SCORES)
    for body, raw in zip(_Teacher.requests, _Teacher.raw, strict=True):
        parts = body["messages"][-1]["content"]
        assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
        text = json.dumps(body["messages"][0]) + parts[0]["text"]
        assert "score" not in json.dumps(sorted(body))
        head = raw.split(b"base64,")[0].decode()  # everything before the image bytes
        for score in SCORES:  # no record's score anywhere in what the teacher received
            for where in (text, head):
                assert not re.search(rf"(?<![\d.]){re.escape(str(score))}(?!\d)", where), score
        # the physics measurements are there, the physics engine's own score is not
        assert "Noise" in text and "HU" in text
        assert not re.search(r"\bscore\b", parts[0]["text"].split("physics-based tool:")[1], re.I)
    records = read_manifest(out, check_images=True)
    assert [r.score for r in records] == list(SCORES)
    assert all(r.explanation == TEACHER_TEXT for r in records)  # its score line dropped


def test_physics_drafts_without_a_teacher(scores_only: Path, tmp_path: Path) -> None:
    out = tmp_path / "explained.jsonl"
    assert qcnode(["train", "explain", str(scores_only), str(out)]) == 0
    records = read_manifest(out)
    assert [r.score for r in records] == list(SCORES)
    for r in records:
        assert r.explanation and "Noise" in r.explanation and "HU" in r.explanation
        assert not re.search(r"\bscore\b", r.explanation, re.I)  # no competing score


def _windowed_tiff(path: Path, metal: bool) -> Path:
    """A simulated abdominal slice as LDCTIQA stores it: W350/L40 grey values in a TIFF."""
    hu, _ = simulate_slice(512, 0.7, 0.3, 0.5, metal, np.random.default_rng(7))
    gray = np.clip((hu - (40.0 - 175.0)) / 350.0, 0.0, 1.0).astype(np.float32)
    Image.fromarray(gray, mode="F").save(path)
    return path


def test_physics_draft_of_a_windowed_slice_measures_what_the_window_still_shows(
    tmp_path: Path,
) -> None:
    """After the 350/40 window air reads −135 HU and metal 215 HU: the body is what lies
    above the floor, bone and metal what sits at the ceiling, so a metal slice's draft
    speaks of its streaks — not of "no dense material" and a body cut by the field of
    view, which is what the fixed −500/2000 HU thresholds described before."""
    engine = PhysicsEngine()
    drafts = {}
    for metal in (True, False):
        image = _windowed_tiff(tmp_path / f"metal{int(metal)}.tif", metal)
        drafts[metal] = physics_draft(Record(image=image, score=1.0, id=str(metal)), engine)
    for text in drafts.values():
        assert "No dense material" not in text
        assert "field of view" not in text
        assert "0.0 HU in fat" not in text  # air at the floor is not fat
    assert "Streaks from" in drafts[True]
    assert "Streaks from" not in drafts[False] and "Bone or metal" in drafts[False]
