"""``qcnode evaluate``: saved predictions, --compare, degenerate runs, report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.metrics import agreement
from node.cli import main as qcnode

REFERENCE = [0.4, 1.2, 2.0, 2.6, 3.4, 3.8, 1.6, 2.2]
GOOD = [0.6, 1.0, 2.2, 2.4, 3.0, 3.9, 1.9, 2.1]
NOISY = [2.0, 1.5, 1.0, 3.5, 2.0, 3.0, 0.5, 2.5]


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i, score in enumerate(REFERENCE):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "score": score, "id": f"r{i}",
                                 "split": "test" if i < 6 else "train"}))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _predictions(path: Path, scores: list[float]) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "score": s}) + "\n"
                            for i, s in enumerate(scores)))
    return path


def test_saved_predictions_side_by_side(labelled: Path, tmp_path: Path) -> None:
    a = _predictions(tmp_path / "a.jsonl", GOOD)
    b = _predictions(tmp_path / "b.jsonl", NOISY)
    out = tmp_path / "eval"
    rc = qcnode(["evaluate", str(labelled), "--predictions", str(a), "--compare",
                 f"predictions={b}", "--out", str(out), "--bootstrap", "200", "--seed", "3",
                 "--worst", "3"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    first, second = report["runs"]
    assert (first["name"], second["name"]) == ("saved-a", "saved-b")
    expected = agreement(REFERENCE, GOOD, n_boot=200, seed=3)
    assert first["agreement"]["srcc"]["value"] == pytest.approx(expected.srcc.value)
    assert first["agreement"]["mae"]["low"] == pytest.approx(expected.mae.low)
    assert first["agreement"]["aggregate"]["value"] == pytest.approx(expected.aggregate.value)
    assert first["agreement"]["srcc"]["value"] > second["agreement"]["srcc"]["value"]
    errors = [abs(p - t) for p, t in zip(NOISY, REFERENCE, strict=True)]
    assert [w["id"] for w in second["worst"]] == [
        f"r{i}" for i in sorted(range(8), key=lambda i: (-errors[i], f"r{i}"))[:3]
    ]
    md = (out / "report.md").read_text()
    assert "| metric | saved-a | saved-b |" in md and r"aggregate \|PLCC\|+\|SRCC\|" in md
    assert "Calibration" in md and "Worst disagreements" in md
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = (out / "predictions-saved-a.jsonl").read_text().splitlines()
    assert len(saved) == 8 and json.loads(saved[0])["score"] == GOOD[0]


def test_split_missing_predictions_and_constant_scores(labelled: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    const = _predictions(tmp_path / "c.jsonl", [2.0] * 5)  # r5 (test split) has none
    out = tmp_path / "eval"
    rc = qcnode(["evaluate", str(labelled), "--split", "test", "--predictions", str(const),
                 "--out", str(out), "--bootstrap", "50"])
    assert rc == 0
    run = json.loads((out / "report.json").read_text())["runs"][0]
    assert run["missing"] == ["r5"]
    assert run["agreement"]["n"] == 5
    assert run["agreement"]["srcc"]["value"] is None
    assert "constant" in run["agreement"]["srcc"]["note"]
    md = (out / "report.md").read_text()
    assert "| SRCC | n/a (the predictions are constant (all 2): a correlation is undefined) |" in md
    assert "1 record(s) have no prediction" in md
    assert "NaN" not in (out / "report.json").read_text()
    assert "SRCC n/a" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(labelled: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"score": 1}\n')
    assert qcnode(["evaluate", str(labelled), "--predictions", str(bad),
                   "--out", str(tmp_path / "o")]) == 1
    assert "bad.jsonl line 1: needs 'id' and 'score'" in capsys.readouterr().err
    assert qcnode(["evaluate", str(labelled), "--compare", "nonsense",
                   "--predictions", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "use physics, vlm, adapter=DIR or predictions=FILE" in capsys.readouterr().err
    assert qcnode(["evaluate", str(labelled), "--engine", "vlm", "--model",
                   str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "nope" in capsys.readouterr().err


def test_compare_adapter_with_base_model_on_the_tiny_vlm(
    labelled: Path, tmp_path: Path, tiny_gemma_dir: Path, tiny_adapter_dir: Path
) -> None:
    out = tmp_path / "eval"
    rc = qcnode(["evaluate", str(labelled), "--split", "test", "--engine", "vlm",
                 "--model", str(tiny_gemma_dir), "--adapter", str(tiny_adapter_dir),
                 "--compare", "vlm", "--device", "cpu", "--out", str(out),
                 "--bootstrap", "50"])
    assert rc == 0
    runs = json.loads((out / "report.json").read_text())["runs"]
    names = [f"vlm+{tiny_adapter_dir.name}", "vlm-base"]
    # each read-out run has its "-text" run beside it (the paper's metric: the score written
    # in the generated answer); the random model writes none, which fails only those
    assert [r["name"] for r in runs] == [names[0], f"{names[0]}-text", names[1], "vlm-base-text"]
    text_runs = [r for r in runs if r["name"].endswith("-text")]
    runs = [r for r in runs if not r["name"].endswith("-text")]
    assert all(r["agreement"] is None and len(r["failed"]) == 6 for r in text_runs)
    assert all(not r["failed"] and not r["missing"] for r in runs), runs
    assert all(r["agreement"]["n"] == 6 for r in runs)
    with_adapter, base = (
        {p["id"]: p["score"] for p in map(json.loads, (out / f"predictions-{r['name']}.jsonl")
                                         .read_text().splitlines())}
        for r in runs
    )
    assert with_adapter.keys() == base.keys() == {f"r{i}" for i in range(6)}
    assert with_adapter != base  # the adapter changes the read-out
