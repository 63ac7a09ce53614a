"""The viewer-safe Basic Text SR companion: the same content in prose.

Basic Text SR (PS3.3 A.35.1) cannot hold NUM or SCOORD items, so scores and measurements
are TEXT items whose values read on their own ("Series quality 2.2 ± 0.5 of 4 (fair)");
slices are named by Instance Number, as the viewer shows them (:mod:`sr_writer.prose`).
No template is claimed (TID 1500 needs NUM). Titled LOINC 18748-4 "Diagnostic Imaging
Report" (a DCM 126000 title makes OHIF v3 look for measurements and show nothing).

Every container is SEPARATE (Continuity of Content), so a viewer shows one line per item
("Image Quality Rating: Series quality …") instead of one run-on paragraph (OHIF joins
the items of a CONTINUOUS container). Order, most important first:

1. Summary: the series score, the score in words, the explanation;
2. Findings: slice scores (each INFERRED FROM its IMAGE), findings, measured evidence;
3. Current Procedure Descriptions: the scale, the algorithm, "not verified", notes;

then, last, the device observer context (TID 1002/1004, with its UID) and the language.
Built with highdicom content items; highdicom has no Basic Text SR class, so its SR base
class is given the SOP class UID.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Final

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    LanguageOfContentItemAndDescendants,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    TextContentItem,
)
from highdicom.sr.sop import _SR
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage

from inference.result import AssessmentResult
from sr_writer import codes, prose
from sr_writer.document import (
    document_attributes,
    library_order,
    observation_context,
    stamp,
)
from sr_writer.sources import check_sources

TEXT_SERIES_NUMBER: Final = 9902
TEXT_SERIES_DESCRIPTION: Final = "Image quality report, text (qcnode)"
CONTAINS = RelationshipTypeValues.CONTAINS
NOT_VERIFIED: Final = "Algorithm output; not verified by a physician"


class BasicTextSR(_SR):
    """Basic Text SR document (1.2.840.10008.5.1.4.1.1.88.11)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sop_class_uid=BasicTextSRStorage, **kwargs)


def _text(name: hd.sr.CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name, value, CONTAINS)


def _section(name: hd.sr.CodedConcept, items: Sequence[Any]) -> ContainerContentItem:
    section = ContainerContentItem(name=name, relationship_type=CONTAINS,
                                   is_content_continuous=False)
    section.ContentSequence = ContentSequence(list(items))
    return section


def _summary(result: AssessmentResult) -> ContainerContentItem:
    items: list[Any] = [
        _text(codes.IMAGE_QUALITY_RATING, prose.series_label(result)),
        CodeContentItem(codes.IMAGE_QUALITY, codes.quality_label(result.score), CONTAINS),
    ]
    if result.explanation:
        items.append(_text(codes.NARRATIVE_SUMMARY, result.explanation))
    return _section(codes.SUMMARY_SECTION, items)


def _findings(result: AssessmentResult, by_uid: dict[str, Dataset]) -> ContainerContentItem:
    numbers = prose.instance_numbers(by_uid.values())
    items: list[Any] = []
    for s in result.slices:
        line = _text(codes.IMAGE_QUALITY_RATING, prose.slice_label(s, numbers))
        ds = by_uid[s.sop_instance_uid]
        frames = [s.frame] if s.frame is not None else None
        line.ContentSequence = ContentSequence(
            [SourceImageForMeasurement(str(ds.SOPClassUID), s.sop_instance_uid, frames)]
        )
        items.append(line)
    items += [_text(codes.FINDING, prose.finding_line(f, numbers)) for f in result.findings]
    if not result.findings:
        items.append(_text(codes.FINDING, "No image quality problem found"))
    for m in result.evidence:
        name, _ = codes.EVIDENCE_CODES[m.name]
        items.append(_text(name, prose.evidence_value(m, numbers)))
    return _section(codes.FINDINGS_SECTION, items)


def _procedure(result: AssessmentResult) -> ContainerContentItem:
    items = [
        _text(codes.COMMENT, prose.scale_line()),
        _text(codes.COMMENT, prose.engine_line(result.engine)),
        _text(codes.COMMENT, NOT_VERIFIED),
        *(_text(codes.COMMENT, f"Note: {note}") for note in result.notes),
    ]
    return _section(codes.PROCEDURE_SECTION, items)


def _content(result: AssessmentResult, by_uid: dict[str, Dataset]) -> ContainerContentItem:
    root = ContainerContentItem(name=codes.TEXT_TITLE, is_content_continuous=False)
    root.ContentSequence = ContentSequence([
        _summary(result),
        _findings(result, by_uid),
        _procedure(result),
        *observation_context(result.engine),
        *LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE),
    ])
    return root


def build_text_sr(
    sources: Sequence[Dataset],
    result: AssessmentResult,
    *,
    job_key: str,
    predecessor: Dataset | None = None,
    created: datetime.datetime | None = None,
    series_number: int = TEXT_SERIES_NUMBER,
) -> Dataset:
    """Build the Basic Text SR companion of :func:`sr_writer.build_sr`'s report.

    Same arguments as :func:`sr_writer.build_sr` (the same ``(job_key, created)`` gives a
    byte-identical dataset: a retried job passes its stored time); its own series (OHIF
    shows only the last instance of an SR series) and UIDs derived from ``job_key``.

    Raises
    ------
    ValueError
        Invalid sources (see :func:`sr_writer.sources.check_sources`).
    """
    by_uid = check_sources(sources, result)
    ordered = library_order(sources, result)
    when = created or datetime.datetime.now()
    sr = BasicTextSR(
        content=_content(result, by_uid),
        **document_attributes(ordered, job_key=job_key, role="text-sr",
                              series_number=series_number,
                              series_description=TEXT_SERIES_DESCRIPTION,
                              predecessor=predecessor, when=when),
    )
    stamp(sr, when)
    return sr
