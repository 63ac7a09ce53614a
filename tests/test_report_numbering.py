"""What a radiologist reads names slices the way the viewer does: by Instance Number.

The series here has Instance Numbers that match neither the array order nor the position
among the assessed slices (descending, 140, 137, … 116), so a text that counts slices
any other way names a number that is not an Instance Number of the series. Every text
is checked: the physics narrative, finding and evidence descriptions, the TID 1500 SR's
TEXT items, the Basic Text SR and the lines of the PDF card. Values for people are
rounded (HU and scores to one decimal); the coded NUM items keep full precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.physics import PhysicsEngine
from inference.prepare import prepare_series
from inference.result import AssessmentResult
from inference.synth import SynthSpec, synthesize
from sr_writer import build_sr, build_text_sr
from sr_writer.card import card_lines
from sr_writer.prose import instance_numbers
from tests.test_sr import JOB, assert_valid

#: "slice 12", "Slice 12 quality", "slices 3, 9 and 12", "image 4 frame 2".
SLICE_REF = re.compile(r"\b(?:[Ss]lices?|[Ii]mage) (\d+(?:(?:, | and )\d+)*)")
FIRST_NUMBER = 140
STEP = 3


def _numbers_named(text: str) -> list[int]:
    return [int(n) for m in SLICE_REF.finditer(text) for n in re.findall(r"\d+", m[1])]


def _texts(items: list[Dataset]) -> Iterator[str]:
    for item in items:
        if item.ValueType == "TEXT":
            yield str(item.TextValue)
        yield from _texts(list(item.get("ContentSequence", [])))


@pytest.fixture(scope="module")
def assessed(tmp_path_factory: pytest.TempPathFactory) -> tuple[
        list[Dataset], AssessmentResult, set[int]]:
    """A metal series (streak texts name slices too), Instance Numbers descending."""
    out = tmp_path_factory.mktemp("numbering")
    synthesize(SynthSpec(artifacts=("metal",), slices=9, size=256, seed=2), out)
    files = sorted((out / "dose1_metal").glob("*.dcm"))
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = FIRST_NUMBER - STEP * i
        ds.save_as(path)
    series = prepare_series(files, k=4)
    result = PhysicsEngine().assess(series)
    assessed_uids = {s.sop_instance_uid for s in series.slices}
    read: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    sources = [ds for ds in read if ds.SOPInstanceUID in assessed_uids]
    numbers = {FIRST_NUMBER - STEP * i for i in range(len(files))}
    counted = {s.index for s in series.slices} | {s.index + 1 for s in series.slices}
    assert not numbers & (counted | set(range(1, len(files) + 1)))  # no number is both
    return sources, result, numbers


def test_every_slice_named_anywhere_is_an_instance_number(assessed, tmp_path) -> None:
    sources, result, numbers = assessed
    sr = build_sr(sources, result, job_key=JOB)
    text_sr = build_text_sr(sources, result, job_key=JOB)
    assert_valid(sr, tmp_path)
    assert_valid(text_sr, tmp_path)
    narrative = [result.explanation, *(f.description for f in result.findings),
                 *(m.description for m in result.evidence), *result.notes]
    shown = {
        "narrative": narrative,
        "TID 1500 SR": list(_texts(list(sr.ContentSequence))),
        "Text SR": list(_texts(list(text_sr.ContentSequence))),
        "PDF card": card_lines(result, instance_numbers(sources)),
    }
    for where, texts in shown.items():
        named = [n for text in texts for n in _numbers_named(text)]
        assert named, f"{where} names no slice: {texts}"
        wrong = sorted(set(named) - numbers)
        assert not wrong, f"{where} names {wrong}, not Instance Numbers of the series: {texts}"
    worst = result.worst_slice
    assert worst is not None
    worst_number = next(int(ds.InstanceNumber) for ds in sources
                        if ds.SOPInstanceUID == worst.sop_instance_uid)
    assert any(line.startswith(f"Slice {worst_number} quality ")
               for line in shown["PDF card"]), shown["PDF card"]


def test_values_are_rounded_for_people_and_exact_in_the_num_items(assessed) -> None:
    sources, result, _ = assessed
    sr = build_sr(sources, result, job_key=JOB)
    text_sr = build_text_sr(sources, result, job_key=JOB)
    texts = [*_texts(list(sr.ContentSequence)), *_texts(list(text_sr.ContentSequence)),
             *card_lines(result, instance_numbers(sources)), result.explanation]
    for text in texts:
        assert not re.search(r"\d\.\d{2,} HU", text), text  # HU to one decimal
        assert not re.search(r"quality \d\.\d{2,}", text), text  # scores to one decimal
        assert not re.search(r"± \d\.\d{2,}", text), text
        assert "sqrt(" not in text and "SD_ref" not in text and "mode of local SD" not in text
    noise = next(m for m in result.evidence if m.name == "noise_hu")
    values = [float(i.MeasuredValueSequence[0].NumericValue) for i in _nums(sr)
              if i.ConceptNameCodeSequence[0].CodeValue == "112183"]
    assert noise.value in values or any(abs(v - noise.value) < 1e-9 for v in values)
    assert round(noise.value, 1) != noise.value  # the test means something: digits cut


def _nums(sr: Dataset) -> Iterator[Dataset]:
    def walk(items: list[Dataset]) -> Iterator[Dataset]:
        for item in items:
            if item.ValueType == "NUM":
                yield item
            yield from walk(list(item.get("ContentSequence", [])))
    return walk(list(sr.ContentSequence))


def test_score_uncertainty_is_encoded_as_tid_310_measurement_properties(assessed) -> None:
    """PS3.16 TID 300 row 8 includes TID 310 "Measurement Properties" with HAS PROPERTIES;
    TID 310 row 5 is the NUM from CID 225 ("+, range of upper measurement uncertainty",
    "-, range of lower …"). TID 300 is order-significant: the properties (row 8) precede
    the spatial coordinates (row 13, TID 320 INFERRED FROM SCOORD)."""
    sources, result, _ = assessed
    sr = build_sr(sources, result, job_key=JOB)
    ratings = [n for n in _nums(sr) if n.ConceptNameCodeSequence[0].CodeValue == "111029"]
    assert len(ratings) == 1 + len(result.slices)
    for num in ratings:
        children = list(num.ContentSequence)
        uncertainty = [(c.RelationshipType, c.ConceptNameCodeSequence[0].CodeValue,
                        c.ConceptNameCodeSequence[0].CodingSchemeDesignator)
                       for c in children if c.ValueType == "NUM"]
        assert uncertainty == [("HAS PROPERTIES", "371886008", "SCT"),
                               ("HAS PROPERTIES", "371885007", "SCT")]
        kinds = [c.ValueType for c in children]
        assert kinds.index("SCOORD") > max(i for i, k in enumerate(kinds) if k == "NUM")


def test_the_prepared_payload_keeps_instance_numbers(tmp_path: Path) -> None:
    """Workers get the prepared series as bytes: the names must survive the trip."""
    from inference.prepare import PreparedSeries

    synthesize(SynthSpec(slices=3, size=64, seed=1), tmp_path)
    files = sorted((tmp_path / "dose1").glob("*.dcm"))
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 301 + i
        ds.save_as(path)
    series = prepare_series(files, k=3)
    back = PreparedSeries.from_bytes(series.to_bytes())
    assert [s.name for s in back.slices] == [s.name for s in series.slices]
    assert {s.name for s in back.slices} == {"slice 301", "slice 302", "slice 303"}


def test_a_result_without_instance_numbers_names_images_by_uid(tmp_path: Path) -> None:
    from tests.support.ctsources import ct_series, sample_result

    sources = ct_series(4)
    for ds in sources:
        ds.InstanceNumber = ""  # Type 2: may be empty
    result = sample_result(sources)
    text_sr = build_text_sr(sources, result, job_key=JOB)
    texts = list(_texts(list(text_sr.ContentSequence)))
    assert not any(re.search(r"\b[Ss]lices? \d", t) for t in texts), texts  # no made-up number
    assert any(f"Image {sources[0].SOPInstanceUID} quality" in t for t in texts), texts


def test_a_frame_is_named_by_its_instance_and_frame_number() -> None:
    from inference.result import Finding, FindingKind, Region, Severity, SliceScore
    from sr_writer.parse import _GROUP
    from sr_writer.prose import finding_label, slice_label
    from sr_writer.tid1500 import _slice_tracking

    s = SliceScore("1.2.3", 1.24, 0.26, frame=12)
    assert slice_label(s, {"1.2.3": 4}) == "Image 4 frame 12 quality 1.2 ± 0.3 of 4 (poor)"
    f = Finding(FindingKind.NOISE, Severity.MILD, "", "1.2.3", Region.box("1.2.3", 1, 1, 5, 5, 12))
    assert finding_label(f, {"1.2.3": 4}) == "Image noise, mild (image 4 frame 12)"
    tracking = _slice_tracking(s, {"1.2.3": 4})
    assert tracking == "qcnode slice 4 frame 12"
    match = _GROUP.match(f"{tracking} [whole image]")
    assert match is not None and match[1] == "qcnode slice"
