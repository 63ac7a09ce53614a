"""Manifest parsing/validation, image loading and the LDCTIQA / DICOM+CSV converters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from inference.dataset import (
    ManifestError,
    load_prepared,
    load_rgb,
    read_manifest,
    validate_manifest,
)
from inference.dataset_convert import ConvertError, convert_dicom_csv, convert_ldctiqa
from inference.prepare import Window
from node.cli import main as qcnode
from tests.support.labelled import phantom, write_ct


def test_manifest_reports_every_bad_record_with_its_line(tmp_path: Path) -> None:
    good = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    lines = [
        {"image": "a.png", "score": 2.4, "split": "train"},
        {"image": "gone.tif", "score": 1.0},
        {"image": "a.png", "score": 4.6, "id": "too-high"},
        "{not json",
        {"image": "broken.png", "score": 3.0},
        {"image": "a.png", "score": 2.0},  # duplicate id "a"
        {"score": 1.0},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    good_records, problems = validate_manifest(manifest)
    assert [r.id for r in good_records] == ["a"]
    got = {p.line: p.message for p in problems}
    assert sorted(got) == [2, 3, 4, 5, 6, 7]
    assert "missing file" in got[2] and "gone.tif" in got[2]
    assert "outside the 0–4 scale" in got[3]
    assert "not valid JSON" in got[4]
    assert "unreadable image broken.png" in got[5]
    assert "duplicate id" in got[6]
    assert "missing 'image'" in got[7]
    with pytest.raises(ManifestError, match="6 bad record"):
        read_manifest(manifest, check_images=True)
    # the command line prints each of them with its line and fails
    assert qcnode(["train", "data", "validate", str(manifest)]) == 1


def test_dicom_record_uses_the_inference_window(tmp_path: Path) -> None:
    hu = phantom()
    hu[:4, :4] = 240.0  # window top
    path = tmp_path / "ct.dcm"
    write_ct(path, hu, series=generate_uid(), study=generate_uid(), z=0.0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "ct.dcm", "score": 3.2}) + "\n")
    (rec,) = read_manifest(manifest, check_images=True)
    window = Window(40.0, 400.0)
    rgb = load_rgb(rec, window)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = window.apply(np.maximum(np.rint(hu).astype(np.float32), -1024.0))
    assert np.array_equal(rgb, expected)
    prepared = load_prepared(rec, window)
    assert prepared.series_instance_uid == pydicom.dcmread(path).SeriesInstanceUID
    assert prepared.slices[0].hu.shape == (64, 64)


def test_ldctiqa_converter_on_a_generated_stand_in(tmp_path: Path) -> None:
    root = tmp_path / "LDCTIQA"
    root.mkdir()
    rng = np.random.default_rng(3)
    scores = {}
    for i in range(6):
        img = rng.random((512, 512), dtype=np.float32)
        Image.fromarray(img).save(root / f"{i:04d}.tif")
        scores[f"{i:04d}.tif"] = round(0.2 * rng.integers(0, 21), 1)
    (root / "train.json").write_text(json.dumps(scores))
    out = tmp_path / "ldctiqa.jsonl"
    assert qcnode(["train", "data", "ldctiqa", str(root), str(out), "--holdout", "2"]) == 0
    records = read_manifest(out, check_images=True)
    assert len(records) == 6
    assert sum(r.split == "test" for r in records) == 2
    assert {r.id: r.score for r in records} == {Path(k).stem: v for k, v in scores.items()}
    first = records[0]
    gray = np.asarray(Image.open(first.image), dtype=np.float32)
    rgb = load_rgb(first, Window())
    assert rgb.shape == (512, 512, 3)
    assert np.array_equal(rgb[..., 0], np.rint(gray * 255).astype(np.uint8))
    hu = load_prepared(first, Window()).slices[0].hu
    assert hu.min() >= 40 - 175 - 1e-3 and hu.max() <= 40 + 175 + 1e-3
    # same seed → same hold-out; a listed file that is missing is named
    again = convert_ldctiqa(root, tmp_path / "again.jsonl", holdout=2)
    assert [r.split for r in again] == [r.split for r in records]
    (root / "0003.tif").unlink()
    with pytest.raises(ConvertError, match=r"0003\.tif"):
        convert_ldctiqa(root, tmp_path / "x.jsonl", holdout=2)


def test_dicom_csv_converter_keeps_series_together(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    uids = []
    for s in range(3):
        series, study = generate_uid(), generate_uid()
        uids.append(series)
        (folder / f"s{s}").mkdir(parents=True)
        for z in range(4):
            write_ct(folder / f"s{s}" / f"{z}.dcm", phantom(seed=z), series=series,
                     study=study, z=float(z))
    scores = tmp_path / "scores.csv"
    scores.write_text(f"series,score\n{uids[0]},1.5\ns1,3.0\n{uids[2]},2.2\n")
    out = tmp_path / "m.jsonl"
    records = convert_dicom_csv(folder, scores, out, k=2, holdout_fraction=0.34)
    assert len(records) == 6
    by_group: dict[str | None, set[str | None]] = {}
    for r in records:
        by_group.setdefault(r.group, set()).add(r.split)
    assert set(by_group) == set(uids)
    assert all(len(splits) == 1 for splits in by_group.values())
    assert sum(s == {"test"} for s in by_group.values()) == 1
    assert {r.score for r in records if r.group == uids[1]} == {3.0}
    assert len(read_manifest(out, check_images=True)) == 6
    scores.write_text("series,score\nnope,1.0\n")
    with pytest.raises(ConvertError, match="'nope' not found"):
        convert_dicom_csv(folder, scores, out)
