"""`qcnode assess --engine vlm` with a hub id or a missing model directory: one clear line.

Run as a subprocess through the installed ``qcnode`` script, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

QCNODE = Path(sys.executable).parent / "qcnode"


def _assess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QCNODE), "assess", "--engine", "vlm", *args], check=False,
        capture_output=True, text=True, timeout=120,
    )


def _the_one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qcnode assess: ")
    assert proc.stdout == ""
    return lines[0]


def test_a_hub_id_names_itself_and_the_local_directory_option(tmp_path: Path) -> None:
    line = _the_one_line(_assess("--model", "google/medgemma-4b-it", str(tmp_path)))
    assert "google/medgemma-4b-it looks like a model hub id" in line
    assert "--model DIR" in line
    assert "does not exist (give a local directory)" not in line  # the old, vaguer message


@pytest.mark.parametrize("flag", ["--model", "--adapter"])
def test_a_missing_directory_names_itself_and_its_option(tmp_path: Path, flag: str) -> None:
    missing = tmp_path / "nowhere"
    args = ["--model", str(missing)] if flag == "--model" else [
        "--model", str(_model_like(tmp_path)), "--adapter", str(missing)
    ]
    line = _the_one_line(_assess(*args, str(tmp_path)))
    what = "model" if flag == "--model" else "adapter"
    assert f"{what} directory {missing} does not exist" in line
    assert f"{flag} DIR" in line


def _model_like(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_a_bad_card_beside_the_model_is_one_line(tmp_path: Path) -> None:
    model = _model_like(tmp_path)
    (model / "qcnode_card.json").write_text('{"max_batch": 0}')
    line = _the_one_line(_assess("--model", str(model), str(tmp_path)))
    assert "max_batch must be a positive integer" in line


@pytest.fixture(scope="module")
def cardless_gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 directory as downloaded from a hub: weights, processor, no card."""
    from tests.support.tiny_gemma import build_tiny_gemma

    model = build_tiny_gemma(tmp_path_factory.mktemp("cardless") / "model")
    assert not (model / "qcnode_card.json").exists()
    return model


def test_a_model_without_a_card_takes_its_own_image_size(cardless_gemma: Path,
                                                         tmp_path: Path) -> None:
    from inference.synth import SynthSpec, synthesize
    from tests.support.tiny_gemma import TINY_IMAGE_SIZE

    synthesize(SynthSpec(slices=3, size=64, seed=4), tmp_path / "ct")
    proc = _assess("--model", str(cardless_gemma), "--json", "--slices", "2",
                   str(tmp_path / "ct" / "dose1"))
    assert proc.returncode == 0, proc.stderr
    assert "belongs to other weights" not in proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["engine"]["name"] == "vlm"
    (note,) = [n for n in row["notes"] if "qcnode_card.json" in n]
    assert f"image size {TINY_IMAGE_SIZE} px from the model's image processor" in note, note
