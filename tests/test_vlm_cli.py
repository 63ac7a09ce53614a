"""`qcnode assess --engine vlm` with a hub id or a missing model directory: one clear line.

Run as a subprocess through the installed ``qcnode`` script, as a user would.
"""

from __future__ import annotations

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
