"""The TID 1500 SR: valid under dciodvfy, rendered by DCMTK, and round-trips.

dciodvfy warnings allowed (documented in sr_writer/codes.py): one "Unrecognized defined
term" per use of the private coding scheme designator 99QCNODE and one for its Coding
Scheme UID. Anything else fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import itertools
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.result import (
    AssessmentResult,
    EngineInfo,
    Finding,
    FindingKind,
    Region,
    Severity,
)
from sr_writer import build_pdf, build_sr, build_text_sr, parse_sr
from sr_writer.sources import DEID_UNKNOWN
from tests.support.ctsources import FIXED_TIME, ct_series, sample_result
from tests.support.dicom3tools import dciodvfy

ALLOWED_WARNINGS = (
    re.compile(r"Unrecognized defined term <99QCNODE> .*Coding Scheme Designator"),
    re.compile(r"Unrecognized defined term <2\.25\.\d+> .*Coding Scheme UID"),
)
JOB = "1.2.3.4|physics|0.1.0|rev-abc|-"


def assert_valid(ds: Dataset, tmp_path: Path) -> None:
    """Zero dciodvfy errors; only the documented warnings (printed for the log)."""
    verdict = dciodvfy(ds, tmp_path)
    print(verdict.report())
    assert verdict.errors == (), verdict.output
    unexpected = [w for w in verdict.warnings if not any(p.search(w) for p in ALLOWED_WARNINGS)]
    assert unexpected == [], unexpected


def dsrdump(ds: Dataset, tmp_path: Path) -> str:
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["/usr/bin/dsrdump", "+Pl", "+U8", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def roundtrip(ds: Dataset, tmp_path: Path) -> AssessmentResult:
    path = tmp_path / "roundtrip.dcm"
    ds.save_as(path, enforce_file_format=True)
    return parse_sr(pydicom.dcmread(path))


@pytest.fixture
def sources() -> list[Dataset]:
    return ct_series(8)


def test_sr_valid_rendered_and_round_trips(sources, tmp_path, dcmtk):
    result = sample_result(sources)
    sr = build_sr(sources, result, job_key=JOB, created=FIXED_TIME)
    assert_valid(sr, tmp_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert "99QCNODE" in {i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence}
    text = dsrdump(sr, tmp_path)
    assert "Image Quality Rating" in text and '"2.2" ({score},UCUM' in text
    assert result.explanation in text
    assert '(121007,DCM,"Device")' in text and "Algorithm Version" in text
    assert roundtrip(sr, tmp_path) == result


def _groups(sr: Dataset) -> list[Dataset]:
    container = next(i for i in sr.ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(container.ContentSequence)


def _scoord(group: Dataset) -> tuple[str, list[tuple[float, float]]]:
    scoord = next(i for i in group.ContentSequence if i.ValueType == "SCOORD")
    uid = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    data = [float(v) for v in scoord.GraphicData]
    return str(uid), list(zip(data[::2], data[1::2], strict=True))


def test_every_group_has_an_image_region_a_comment_and_num_has_scoord(sources):
    """OHIF needs a region in every group, reads the SCOORD under the NUM and labels its
    measurement panel with the group's TEXT Comment (TID 1410 text evaluation row)."""
    result = sample_result(sources)
    sr = build_sr(sources, result, job_key=JOB)
    groups = _groups(sr)
    assert len(groups) == 1 + 8 + 4 + 4
    for group in groups:
        kinds = [i.ValueType for i in group.ContentSequence]
        assert "SCOORD" in kinds
        comments = [i for i in group.ContentSequence if i.ValueType == "TEXT"
                    and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
        assert len(comments) == 1 and comments[0].RelationshipType == "CONTAINS"
        for num in (i for i in group.ContentSequence if i.ValueType == "NUM"):
            assert [c.RelationshipType for c in num.ContentSequence
                    if c.ValueType == "SCOORD"] == ["INFERRED FROM"]
            assert "TEXT" not in {c.ValueType for c in num.ContentSequence}  # TID 1419
    series_group = groups[0]
    num = next(i for i in series_group.ContentSequence if i.ValueType == "NUM")
    assert num.ConceptNameCodeSequence[0].CodeValue == "111029"
    assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "{score}"
    comment = next(i for i in series_group.ContentSequence if i.ValueType == "TEXT"
                   and i.ConceptNameCodeSequence[0].CodeValue == "121106")
    assert comment.TextValue == "Series quality 2.2 ± 0.5 of 4 (fair)"
    worst = result.worst_slice
    assert worst is not None and worst.region is not None
    uid, points = _scoord(series_group)
    assert uid == worst.sop_instance_uid
    assert points != list(worst.region.points), "series label would hide under the slice's"


def _label_anchor(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Where OHIF 3.13 writes a group's label: right end, half-way down."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return max(xs), (min(ys) + max(ys)) / 2


def test_markers_are_inset_and_their_labels_do_not_stack(sources):
    """Groups without a region of their own get marker boxes inside the image, apart."""
    result = sample_result(sources)
    sr = build_sr(sources, result, job_key=JOB)
    size = float(sources[0].Columns)
    anchors: dict[str, list[tuple[float, float]]] = {}
    markers = 0
    for group in _groups(sr):
        tracking = next(str(i.TextValue) for i in group.ContentSequence
                        if i.ConceptNameCodeSequence[0].CodeValue == "112039")
        if not tracking.endswith(("[series]", "[whole image]")):
            continue
        markers += 1
        uid, points = _scoord(group)
        assert all(1 <= c <= size - 1 and 1 <= r <= size - 1 for c, r in points), points
        anchors.setdefault(uid, []).append(_label_anchor(points))
    assert markers == 1 + 1 + 3 + 3  # series, slice 2, findings and evidence without regions
    for on_image in anchors.values():
        ys = sorted(y for _, y in on_image)
        assert all(b - a >= 0.05 * size for a, b in itertools.pairwise(ys)), ys


def test_image_library_holds_only_the_assessed_slices_worst_first(sources):
    result = sample_result(sources[:3])
    sr = build_sr(sources[:3], result, job_key=JOB)
    library = next(i for i in sr.ContentSequence
                   if i.ConceptNameCodeSequence[0].CodeValue == "111028")
    images = [e for g in library.ContentSequence for e in g.ContentSequence
              if e.ValueType == "IMAGE"]
    uids = [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in images]
    assert result.worst_slice is not None
    assert uids[0] == result.worst_slice.sop_instance_uid
    assert sorted(uids) == sorted(str(d.SOPInstanceUID) for d in sources[:3])


def test_uids_are_deterministic_per_job_and_predecessor_is_referenced(sources, tmp_path):
    result = sample_result(sources)
    first = build_sr(sources, result, job_key=JOB)
    again = build_sr(sources, result, job_key=JOB)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SOPInstanceUID.startswith("2.25.")
    newer = build_sr(sources, result, job_key=JOB + "|v2", predecessor=first)
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID
    pre = newer.PredecessorDocumentsSequence[0]
    ref = pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert_valid(newer, tmp_path)


@pytest.mark.parametrize("explanation", [
    "Rauschen deutlich über dem Üblichen; Streifen an der Hüfte. Größe: ÄÖÜß.",
    "ノイズが多く、股関節付近にストリークアーチファクトがあります。画質は普通です。",
])
def test_unicode_survives(tmp_path, explanation):
    sources = ct_series(4, patient_name="Müller^Jürgen")
    result = sample_result(sources, explanation=explanation)
    sr = build_sr(sources, result, job_key=JOB)
    assert_valid(sr, tmp_path)
    back = roundtrip(sr, tmp_path)
    assert back.explanation == explanation
    assert back == result
    assert explanation in dsrdump(sr, tmp_path)


def test_long_explanation_no_findings_and_missing_optional_attributes(tmp_path):
    sources = ct_series(3, accession=None, birth_date=None)
    long_text = ("Sehr langer Text über Bildqualität. " * 600)[:20000]
    result = sample_result(sources, explanation=long_text, findings=False)
    sr = build_sr(sources, result, job_key=JOB)
    assert_valid(sr, tmp_path)
    assert sr.AccessionNumber == "" and sr.PatientBirthDate == ""
    back = roundtrip(sr, tmp_path)
    assert back.findings == () and len(back.explanation) == 20000
    assert back == result


def test_minimal_result_without_slices(tmp_path):
    sources = ct_series(2)
    result = AssessmentResult(
        str(sources[0].StudyInstanceUID), str(sources[0].SeriesInstanceUID), 4.0, None,
        "", EngineInfo("physics", "0.1.0"),
        findings=(Finding(FindingKind.BLUR, Severity.NONE),),
    )
    sr = build_sr(sources, result, job_key=JOB)
    assert_valid(sr, tmp_path)
    assert roundtrip(sr, tmp_path) == result


def test_imperfect_source_identity_is_copied_carefully(tmp_path):
    sources = ct_series(3)
    for ds in sources:
        ds.PatientIdentityRemoved = "YES"  # but no De-identification Method: a source defect
    source_verdict = dciodvfy(sources[0], tmp_path)
    print(source_verdict.report())
    assert any("De-identification Method" in e or "DeidentificationMethod" in e
               for e in source_verdict.errors), source_verdict.output
    sr = build_sr(sources, sample_result(sources), job_key=JOB)
    assert_valid(sr, tmp_path)
    assert sr.PatientIdentityRemoved == "YES"
    assert sr.DeidentificationMethod == DEID_UNKNOWN
    assert (sr.PatientName, sr.PatientID) == (sources[0].PatientName, sources[0].PatientID)


def test_latin1_source_identity_is_reencoded_as_utf8(tmp_path):
    sources = ct_series(2, patient_name="Größe^Jürgen")
    path = tmp_path / "latin1.dcm"
    ds = sources[0]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.save_as(path, enforce_file_format=True)
    latin = pydicom.dcmread(path)
    assert b"Gr\xf6\xdfe" in path.read_bytes()
    sr = build_sr([latin, sources[1]], sample_result([latin, sources[1]]), job_key=JOB)
    assert_valid(sr, tmp_path)
    assert str(sr.PatientName) == "Größe^Jürgen"


def test_wrong_inputs_raise_value_error(sources):
    result = sample_result(sources)
    not_image = Dataset()
    not_image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(not_image, key, getattr(sources[0], key))
    not_image.Modality, not_image.Rows, not_image.Columns = "SR", 1, 1
    with pytest.raises(ValueError, match="not an image"):
        build_sr([not_image, *sources[1:]], result, job_key=JOB)
    with pytest.raises(ValueError, match="lacks"):
        build_sr([Dataset()], result, job_key=JOB)
    with pytest.raises(ValueError, match="at least one"):
        build_sr([], result, job_key=JOB)
    with pytest.raises(ValueError, match="study"):
        build_sr(ct_series(2), result, job_key=JOB)
    with pytest.raises(ValueError, match="not a source"):
        build_sr(sources[:2], result, job_key=JOB)
    with pytest.raises(ValueError, match="outside the 0–4"):
        AssessmentResult(result.study_instance_uid, result.series_instance_uid, 4.5, None, "",
                         result.engine)
    stray = sample_result(sources)
    moved = dataclasses.replace(stray.slices[0], region=Region.box(
        str(sources[1].SOPInstanceUID), 0, 0, 4, 4))
    stray = dataclasses.replace(stray, slices=(moved, *stray.slices[1:]))
    with pytest.raises(ValueError, match="belongs to an item naming"):
        build_sr(sources, stray, job_key=JOB)
    bypassed = sample_result(sources)
    object.__setattr__(bypassed, "score", 5.0)  # a result whose own check was bypassed
    with pytest.raises(ValueError, match="outside the 0–4"):
        build_sr(sources, bypassed, job_key=JOB)
    with pytest.raises(ValueError, match="job_key"):
        build_sr(sources, result, job_key="")


def test_other_study_series_mismatch_raises(sources):
    result = sample_result(sources)
    other = ct_series(1, study_uid=str(sources[0].StudyInstanceUID))
    with pytest.raises(ValueError, match="series"):
        build_sr([*sources, *other], result, job_key=JOB)
    assert generate_uid() != result.series_instance_uid


@pytest.mark.parametrize("builder", [build_sr, build_text_sr, build_pdf])
def test_same_job_and_time_give_identical_bytes(sources, builder):
    """A retried job passes its stored time and re-creates the object byte for byte."""
    result = sample_result(sources)

    def encoded(created: datetime.datetime) -> bytes:
        buf = io.BytesIO()
        dcmwrite(buf, builder(sources, result, job_key=JOB, created=created),
                 enforce_file_format=True)
        return buf.getvalue()

    first = encoded(FIXED_TIME)
    assert encoded(FIXED_TIME) == first
    later = FIXED_TIME + datetime.timedelta(seconds=1)
    assert encoded(later) != first  # the time is really used, nothing else varies


def test_build_time_sanity_bound(sources):
    """Speed is measured in benches; this is only a sanity bound (8 slices, full result)."""
    result = sample_result(sources)
    build_sr(sources, result, job_key=JOB)  # warm-up: imports and highdicom's tables
    start = time.perf_counter()
    build_sr(sources, result, job_key=JOB)
    elapsed = time.perf_counter() - start
    print(f"build_sr, 8 slices: {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
