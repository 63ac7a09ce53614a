"""Viewer-safe companions: the Basic Text SR and the Encapsulated PDF quality card."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

from sr_writer import build_pdf, build_sr, build_text_sr, extract_pdf
from sr_writer.card import cjk_font_file
from sr_writer.prose import person_name
from tests.support.ctsources import ct_series, sample_result
from tests.support.dicom3tools import dciodvfy
from tests.test_sr import JOB, assert_valid, dsrdump


def test_helper_sources_are_valid_ct(tmp_path):
    verdict = dciodvfy(ct_series(1)[0], tmp_path)
    print(verdict.report())
    assert verdict.errors == ()


def test_text_sr_valid_without_num_and_in_prose(tmp_path, dcmtk):
    sources = ct_series(8)
    explanation = "Rauschen über dem Üblichen; ノイズが多い。"
    result = sample_result(sources, explanation=explanation)
    text_sr = build_text_sr(sources, result, job_key=JOB)
    assert_valid(text_sr, tmp_path)
    assert text_sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert (text_sr.CompletionFlag, text_sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")

    def value_types(items):
        for item in items:
            yield item.ValueType
            yield from value_types(item.get("ContentSequence", []))

    kinds = set(value_types(text_sr.ContentSequence))
    assert not kinds & {"NUM", "SCOORD", "SCOORD3D"}
    title = text_sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")  # not 126000
    rendered = dsrdump(text_sr, tmp_path)
    assert "Series quality 2.2 ± 0.5 of 4 (fair)" in rendered
    assert explanation in rendered
    assert "Streak artifact, severe (slice 3) – Streaks from the left hip." in rendered
    sr = build_sr(sources, result, job_key=JOB)
    assert text_sr.SeriesInstanceUID not in (sr.SeriesInstanceUID, sources[0].SeriesInstanceUID)
    assert text_sr.StudyInstanceUID == sr.StudyInstanceUID


def test_text_sr_reads_line_by_line_score_first_device_last():
    """SEPARATE containers (one line per item in OHIF); summary first, device UID last."""
    sources = ct_series(4)
    text_sr = build_text_sr(sources, sample_result(sources), job_key=JOB)
    assert text_sr.ContinuityOfContent == "SEPARATE"
    top = list(text_sr.ContentSequence)
    sections = [i for i in top if i.ValueType == "CONTAINER"]
    assert [c.ConceptNameCodeSequence[0].CodeMeaning for c in sections] == [
        "Summary", "Findings", "Current Procedure Descriptions"]
    assert all(c.ContinuityOfContent == "SEPARATE" for c in sections)
    assert top[:3] == sections  # sections before the observer context
    assert {i.RelationshipType for i in top[3:]} == {"HAS OBS CONTEXT", "HAS CONCEPT MOD"}
    summary = [i.ConceptNameCodeSequence[0].CodeValue for i in sections[0].ContentSequence]
    assert summary == ["111029", "111101", "111412"]  # score, in words, explanation
    longest = max(len(str(i.get("TextValue", ""))) for c in sections for i in c.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue != "111412")
    assert longest <= 120  # short lines; only the explanation is long


def _pdf_text(pdf: bytes) -> bytes:
    """Decompressed content streams (reportlab writes Flate streams)."""
    out = b""
    for chunk in pdf.split(b"stream\r\n")[1:] + pdf.split(b"stream\n")[1:]:
        body = chunk.split(b"endstream")[0]
        try:
            out += zlib.decompress(body)
        except zlib.error:
            continue
    return out


@pytest.mark.parametrize("rgb", [False, True])
def test_pdf_card_valid_one_page_with_image(tmp_path, rgb):
    sources = ct_series(8)
    result = sample_result(sources, explanation="x" * 20000)
    gray = (np.indices((128, 128)).sum(0) % 256).astype(np.uint8)
    image = np.stack([gray] * 3, axis=-1) if rgb else gray
    card = build_pdf(sources, result, job_key=JOB, image=image)
    assert_valid(card, tmp_path)
    pdf = extract_pdf(card)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert re.findall(rb"/Count (\d+)", pdf) == [b"1"]  # one page
    assert b"/Subtype /Image" in pdf
    assert card.Modality == "DOC" and card.BurnedInAnnotation == "YES"
    assert card.StudyInstanceUID == sources[0].StudyInstanceUID
    assert card.SOPInstanceUID == build_pdf(sources, result, job_key=JOB).SOPInstanceUID
    (tmp_path / "card.pdf").write_bytes(pdf)


def test_pdf_card_without_image_or_findings(tmp_path):
    sources = ct_series(2, accession=None, birth_date=None)
    result = sample_result(sources, findings=False, explanation="Größe ÄÖÜ, 画質は普通")
    card = build_pdf(sources, result, job_key=JOB)
    assert_valid(card, tmp_path)
    assert len(_pdf_text(extract_pdf(card))) > 0


def test_pdf_card_embeds_its_japanese_font_and_formats_the_name():
    font = cjk_font_file()
    assert font is not None, "no CJK TrueType font: run `make system-deps` (fonts-vlgothic)"
    sources = ct_series(2)
    card = build_pdf(sources, sample_result(sources, explanation="画質は普通です。"),
                     job_key=JOB)
    pdf = extract_pdf(card)
    assert b"HeiseiKakuGo" not in pdf  # the non-embedded CID fallback is not used
    assert pdf.count(b"/FontFile2") >= 2  # Latin and CJK TrueType subsets embedded
    assert b"VL-PGothic" in pdf or b"VLPGothic" in pdf or b"VL PGothic" in pdf


@pytest.mark.parametrize(("pn", "shown"), [
    ("Muster^Jürgen", "Muster, Jürgen"),
    ("Muster^Jürgen^Karl^Dr.^MD", "Muster, Dr. Jürgen Karl, MD"),
    ("Muster", "Muster"),
    ("^Jürgen", "Jürgen"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada, Tarou (山田 太郎)"),
    ("", ""),
])
def test_person_names_are_formatted_for_people(pn, shown):
    assert person_name(pn) == shown


def test_pdf_card_rejects_a_wrong_image():
    sources = ct_series(2)
    with pytest.raises(ValueError, match="uint8"):
        build_pdf(sources, sample_result(sources), job_key=JOB,
                  image=np.zeros((8, 8), dtype=np.float32))
