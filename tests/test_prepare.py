"""Slice preparation: sorting, HU, padding, multi-frame, compressed, payload, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.dicom import ENHANCED_CT_IMAGE_STORAGE, PrepareError
from inference.prepare import PreparedSeries, Window, group_series, prepare_series
from inference.synth import SynthSpec, synthesize


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    synthesize(SynthSpec(slices=5, size=128, seed=7), out)
    return out / "dose1"


def test_sorted_hu_and_roundtrip(small: Path) -> None:
    series = prepare_series([small], k=5)
    assert series.total_slices == 5 and len(series.slices) == 5
    zs = [s.z for s in series.slices]
    assert zs == sorted(zs) and [s.index for s in series.slices] == list(range(5))
    ds = pydicom.dcmread(next(small.glob("IM0003.dcm")))
    stored = ds.pixel_array.astype(np.float32)
    hu = next(s.hu for s in series.slices if s.sop_instance_uid == ds.SOPInstanceUID)
    np.testing.assert_array_equal(np.maximum(stored - 1024, -1024), hu)
    rgb = series.slices[0].rgb
    assert rgb.dtype == np.uint8 and rgb.shape == (128, 128, 3)
    back = PreparedSeries.from_bytes(series.to_bytes())
    assert back.series_instance_uid == series.series_instance_uid
    np.testing.assert_array_equal(back.slices[2].hu, series.slices[2].hu)
    np.testing.assert_array_equal(back.slices[2].rgb, series.slices[2].rgb)
    assert len(series.to_bytes()) < 5 * 128 * 128 * 5  # compressed


def test_multi_window_and_selection(small: Path) -> None:
    series = prepare_series([small], k=2, window=Window(mode="multi"))
    assert len(series.slices) == 2
    hu, rgb = series.slices[0].hu, series.slices[0].rgb
    air = hu <= -1024
    assert (rgb[air] == 0).all()
    soft = (hu > 40) & (hu < 60)
    assert rgb[soft][:, 0].mean() > 120 and rgb[soft][:, 2].mean() > 100


def test_compressed_matches_uncompressed(tmp_path: Path, small: Path) -> None:
    synthesize(SynthSpec(slices=5, size=128, seed=7, transfer_syntax="jpeg-ls"), tmp_path)
    a = prepare_series([small], k=5)
    b = prepare_series([tmp_path / "dose1"], k=5)
    ts = pydicom.dcmread(next((tmp_path / "dose1").glob("*.dcm"))).file_meta.TransferSyntaxUID
    assert ts.is_compressed
    for x, y in zip(a.slices, b.slices, strict=True):
        np.testing.assert_array_equal(x.hu, y.hu)


def _enhanced(small: Path, out: Path, padding: int | None = None) -> Path:
    """An Enhanced CT-style multi-frame file built from the single-frame slices."""
    files = sorted(small.glob("*.dcm"))
    frames = [pydicom.dcmread(f) for f in files]
    ds = copy.deepcopy(frames[0])
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "RescaleIntercept", "RescaleSlope", "SliceLocation"):
        del ds[kw]
    ds.SOPClassUID = UID(ENHANCED_CT_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPClassUID = UID(ENHANCED_CT_IMAGE_STORAGE)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    measures, orient, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = frames[0].PixelSpacing
    orient.ImageOrientationPatient = frames[0].ImageOrientationPatient
    rescale.RescaleIntercept, rescale.RescaleSlope = -1024, 1
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for f in frames:  # frame 1 is the highest z: sorting must reverse them
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = f.ImagePositionPatient
        item.PlanePositionSequence = DicomSequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    pixels = np.stack([f.pixel_array for f in frames])
    if padding is not None:
        ds.add_new(0x00280120, "US", padding)  # Pixel Padding Value
        pixels[:, :4, :4] = padding
    ds.PixelData = pixels.tobytes()
    path = out / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multi_frame_with_padding(tmp_path: Path, small: Path) -> None:
    path = _enhanced(small, tmp_path, padding=3000)
    single = prepare_series([small], k=5)
    multi = prepare_series([path], k=5)
    assert multi.total_slices == 5
    assert [s.frame for s in multi.slices] == [5, 4, 3, 2, 1]
    assert [s.z for s in multi.slices] == [s.z for s in single.slices]
    for x, y in zip(single.slices, multi.slices, strict=True):
        assert (y.hu[:4, :4] == -1024).all()  # padding became air
        np.testing.assert_array_equal(x.hu[4:], y.hu[4:])


def test_group_series_splits_series(tmp_path: Path) -> None:
    synthesize(SynthSpec(dose_levels=(1.0, 0.5), slices=2, size=64), tmp_path)
    (tmp_path / "notes.txt").write_text("not dicom")
    groups = group_series([tmp_path])
    assert len(groups) == 2 and all(len(v) == 2 for v in groups.values())


def test_bad_input_errors(tmp_path: Path, small: Path) -> None:
    files = sorted(small.glob("*.dcm"))
    with pytest.raises(PrepareError, match="at least 2"):
        prepare_series(files[:1])
    mr = tmp_path / "mr"
    mr.mkdir()
    for f in files[:2]:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(mr / f.name)
    with pytest.raises(PrepareError, match="not CT"):
        prepare_series([mr])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in files[:3]:
        (corrupt / f.name).write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(PrepareError, match="pixel data"):
        prepare_series([corrupt])
    text = tmp_path / "notes.txt"
    text.write_text("not dicom")
    with pytest.raises(PrepareError, match="no DICOM"):
        prepare_series([text])


def test_missing_pixel_spacing_is_noted_not_silent(tmp_path: Path, small: Path) -> None:
    """A plane without Pixel Spacing (Type 1 in the CT Image module) is still assessed at
    1 mm per pixel, and the series, its payload and the physics result say so."""
    assert prepare_series([small], k=5).notes == ()
    for path in sorted(small.glob("IM*.dcm")):
        ds = pydicom.dcmread(path)
        if path.name in ("IM0002.dcm", "IM0004.dcm"):
            del ds.PixelSpacing
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
    series = prepare_series([tmp_path], k=5)
    (note,) = series.notes
    assert "Pixel Spacing missing or invalid on 2 of 5" in note
    assert PreparedSeries.from_bytes(series.to_bytes()).notes == series.notes
    from inference.physics import PhysicsEngine

    assert note in PhysicsEngine().assess(series).notes
