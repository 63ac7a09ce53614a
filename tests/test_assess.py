"""`qcnode assess` end to end as a subprocess: JSON lines, SR output, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from inference.synth import SynthSpec, synthesize
from sr_writer import extract_pdf
from tests.support.dicom3tools import dciodvfy

QCNODE = Path(sys.executable).parent / "qcnode"
WARNING = "qcnode assess: warning: skipped "


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(QCNODE), "assess", *args], check=False,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("assess")
    synthesize(SynthSpec(dose_levels=(1.0, 0.125), slices=4, size=256, seed=11), out)
    return out


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.startswith("qcnode assess:") and not ln.startswith(WARNING)]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_assess_json_one_line_per_series(study: Path) -> None:
    proc = _run(str(study), "--json", "--slices", "4")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"series_instance_uid", "score", "uncertainty", "findings", "explanation",
                "engine"} <= row.keys()
        assert row["engine"]["name"] == "physics"
    by_dose = {json.loads((study / d / "truth.json").read_text())["series_instance_uid"]: d
               for d in ("dose1", "dose0.125")}
    scores = {by_dose[r["series_instance_uid"]]: r["score"] for r in rows}
    assert scores["dose1"] > scores["dose0.125"]


def test_assess_human_and_sr_out(study: Path, tmp_path: Path) -> None:
    proc = _run(str(study / "dose1"), "--sr-out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "score" in proc.stdout and "Noise" in proc.stdout
    written = {p.name.split("_")[0]: pydicom.dcmread(p) for p in tmp_path.glob("*.dcm")}
    assert sorted(written) == ["PDF", "SR", "TEXT"]  # the SR and both companions
    assert written["SR"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert written["TEXT"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert written["PDF"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert b"/Subtype /Image" in extract_pdf(written["PDF"])  # the worst slice is on the card
    for kind, ds in written.items():
        assert ds.StudyInstanceUID == written["SR"].StudyInstanceUID
        verdict = dciodvfy(ds, tmp_path)
        assert verdict.errors == (), f"{kind}: {verdict.output}"


def test_assess_bad_inputs(study: Path, tmp_path: Path) -> None:
    files = sorted((study / "dose1").glob("*.dcm"))
    _one_line_error(_run(str(files[0])), "at least 2")
    mr = tmp_path / "mr"
    mr.mkdir()
    for f in files[:2]:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(mr / f.name)
    _one_line_error(_run(str(mr)), "not CT")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in files[:3]:
        (corrupt / f.name).write_bytes(f.read_bytes()[:-4000])
    _one_line_error(_run(str(corrupt)), "pixel data")
    _one_line_error(_run(str(study), "--engine", "vlm", "--model", str(tmp_path / "nope")),
                    "model directory")
    _one_line_error(_run(str(tmp_path / "missing")), "no such file")


def test_assess_reports_each_skipped_file_and_assesses_the_rest(study: Path,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    files = sorted((study / "dose1").glob("*.dcm"))
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "cut.dcm").write_bytes(files[0].read_bytes()[:300])  # cut before the UIDs
    no_image = pydicom.dcmread(files[0])
    del no_image.Rows
    del no_image.PixelData
    no_image.SOPInstanceUID = generate_uid()
    no_image.save_as(folder / "noimage.dcm")
    proc = _run(str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["series_instance_uid"] for r in rows] == [no_image.SeriesInstanceUID]
    warnings = {}
    for line in proc.stderr.splitlines():
        if line.startswith(WARNING):
            path, _, why = line[len(WARNING):].partition(": ")
            warnings[Path(path).name] = why
    assert set(warnings) == {"notes.txt", "cut.dcm", "noimage.dcm"}, proc.stderr
    assert "not a DICOM file" in warnings["notes.txt"]
    assert "no Series Instance UID or SOP Instance UID" in warnings["cut.dcm"]
    assert "not an image instance" in warnings["noimage.dcm"]
    assert "Traceback" not in proc.stderr
