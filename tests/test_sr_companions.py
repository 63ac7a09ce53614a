"""Viewer-safe companions: the Basic Text SR and the Encapsulated PDF quality card."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

from sr_writer import build_pdf, build_sr, build_text_sr, extract_pdf
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
    rendered = dsrdump(text_sr, tmp_path)
    assert "Image quality rating (series): 2.20 ± 0.45 of 4 (fair)" in rendered
    assert explanation in rendered
    assert "Finding: Streak artifact, severe (slice" in rendered
    sr = build_sr(sources, result, job_key=JOB)
    assert text_sr.SeriesInstanceUID not in (sr.SeriesInstanceUID, sources[0].SeriesInstanceUID)
    assert text_sr.StudyInstanceUID == sr.StudyInstanceUID


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


def test_pdf_card_rejects_a_wrong_image():
    sources = ct_series(2)
    with pytest.raises(ValueError, match="uint8"):
        build_pdf(sources, sample_result(sources), job_key=JOB,
                  image=np.zeros((8, 8), dtype=np.float32))
