"""End to end: ``qcnode synth`` series labelled by dose → ``qcnode evaluate`` (physics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from inference.dataset import read_manifest
from node.cli import main as qcnode

DOSES = (1.0, 0.5, 0.25, 0.125, 0.0625)


def dose_score(dose: float) -> float:
    """A radiologist-like label: 4 at routine dose, one point less per halving."""
    return max(0.0, min(4.0, 4.0 + math.log2(dose)))


def test_evaluate_physics_on_synth_series(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    synth = tmp_path / "synth"
    assert qcnode(["synth", str(synth), "--dose-levels", *map(str, DOSES),
                   "--slices", "4", "--size", "128", "--seed", "5"]) == 0
    manifest = tmp_path / "synth.jsonl"
    lines = []
    for truth_file in sorted(synth.glob("*/truth.json")):
        truth = json.loads(truth_file.read_text())
        lines.append(json.dumps({
            "image": str(truth_file.parent.relative_to(tmp_path)),  # a whole series
            "score": dose_score(truth["dose"]), "id": f"dose{truth['dose']:g}", "split": "test",
        }))
    manifest.write_text("\n".join(lines) + "\n")
    assert len(read_manifest(manifest, check_images=True)) == len(DOSES)

    out = tmp_path / "eval"
    rc = qcnode(["evaluate", str(manifest), "--engine", "physics", "--slices", "4",
                 "--out", str(out), "--bootstrap", "200", "--worst", "2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads((out / "report.json").read_text())
    (run,) = report["runs"]
    assert run["name"] == "physics" and not run["failed"] and not run["missing"]
    agree = run["agreement"]
    assert agree["n"] == len(DOSES)
    # the physics score must fall with dose as the labels do
    assert agree["srcc"]["value"] >= 0.9, agree["srcc"]
    assert agree["aggregate"]["value"] > 2.0
    assert len(run["worst"]) == 2
    saved = (out / "predictions-physics.jsonl").read_text().splitlines()
    predictions = [json.loads(x) for x in saved]
    assert all(p["explanation"] for p in predictions)
    assert "physics: n=5 SRCC" in printed
    assert (out / "scatter.png").stat().st_size > 1000
    assert "| SRCC |" in (out / "report.md").read_text()
