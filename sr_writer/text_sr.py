"""The viewer-safe Basic Text SR companion: the same content in prose.

Basic Text SR (PS3.3 A.35.1) cannot hold NUM or SCOORD items, so scores and measurements
are TEXT items whose values read on their own ("Image quality rating (series): 2.20 …"),
since some viewers hide concept names. Each slice line is INFERRED FROM its IMAGE. No
template is claimed (TID 1500 needs NUM); the tree is: title container → language,
device observer (TID 1002/1004), the series score, the score in words, the explanation,
algorithm, slice scores, findings, evidence, notes. Built with highdicom content items;
highdicom has no Basic Text SR class, so its SR base class is given the SOP class UID.
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
from sr_writer.sources import check_sources, identity_dataset
from sr_writer.tid1500 import (
    MANUFACTURER,
    SPECIFIC_CHARACTER_SET,
    library_order,
    observation_context,
)
from sr_writer.uids import derive_uid

TEXT_SERIES_NUMBER: Final = 9902
TEXT_SERIES_DESCRIPTION: Final = "Image quality report, text (qcnode)"
CONTAINS = RelationshipTypeValues.CONTAINS


class BasicTextSR(_SR):
    """Basic Text SR document (1.2.840.10008.5.1.4.1.1.88.11)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sop_class_uid=BasicTextSRStorage, **kwargs)


def _text(name: hd.sr.CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name, value, CONTAINS)


def _content(result: AssessmentResult, by_uid: dict[str, Dataset]) -> ContainerContentItem:
    root = ContainerContentItem(name=codes.TITLE)
    items: list[Any] = [
        *LanguageOfContentItemAndDescendants(hd.sr.templates.DEFAULT_LANGUAGE),
        *observation_context(result.engine),
        _text(codes.IMAGE_QUALITY_RATING, prose.score_line(result)),
        CodeContentItem(codes.IMAGE_QUALITY, codes.quality_label(result.score), CONTAINS),
    ]
    if result.explanation:
        items.append(_text(codes.NARRATIVE_SUMMARY, result.explanation))
    items.append(_text(codes.COMMENT, prose.engine_line(result.engine)))
    for n, s in enumerate(result.slices, 1):
        line = _text(codes.IMAGE_QUALITY_RATING, prose.slice_line(n, s))
        ds = by_uid[s.sop_instance_uid]
        frames = [s.frame] if s.frame is not None else None
        line.ContentSequence = ContentSequence(
            [SourceImageForMeasurement(str(ds.SOPClassUID), s.sop_instance_uid, frames)]
        )
        items.append(line)
    for f in result.findings:
        items.append(_text(codes.FINDING_CODES[f.kind],
                           prose.finding_line(f, prose.where(result, f.sop_instance_uid))))
    for m in result.evidence:
        name, _ = codes.EVIDENCE_CODES[m.name]
        items.append(_text(name, prose.evidence_line(m, prose.where(result, m.sop_instance_uid))))
    items += [_text(codes.COMMENT, f"Note: {note}") for note in result.notes]
    root.ContentSequence = ContentSequence(items)
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

    Same arguments as :func:`sr_writer.build_sr`; its own series (OHIF shows only the
    last instance of an SR series) and UIDs derived from ``job_key``.

    Raises
    ------
    ValueError
        Invalid sources (see :func:`sr_writer.sources.check_sources`).
    """
    by_uid = check_sources(sources, result)
    ordered = library_order(sources, result)
    when = created or datetime.datetime.now()
    sr = BasicTextSR(
        evidence=[identity_dataset(ds) for ds in ordered],
        content=_content(result, by_uid),
        series_instance_uid=derive_uid(job_key, "text-sr-series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(job_key, "text-sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        specific_character_set=SPECIFIC_CHARACTER_SET,
        series_description=TEXT_SERIES_DESCRIPTION,
        content_date=when.date(),
        content_time=when.time(),
    )
    sr.CodingSchemeIdentificationSequence = codes.coding_scheme_identification()
    return sr
