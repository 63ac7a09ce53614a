"""The Comprehensive 3D SR: a TID 1500 Measurement Report of one quality assessment.

Content tree (PS3.16 TID 1500, built with highdicom's template classes):

- TID 1500 root: language, observer context (TID 1002 with a *device* observer, TID
  1004), procedure reported, image library (TID 1600) of the assessed slices, worst first.
- Imaging Measurements: TID 1410 planar-ROI groups only, each with an image region
  (OHIF v3 needs one in every group):

  * ``qcnode series quality`` on the worst slice: NUM DCM 111029 "Image Quality Rating"
    (UCUM ``{score}``) with its uncertainty (TID 310), the score in words (DCM 111101
    "Image Quality") and the TID 4019 algorithm identification (engine name, version,
    model and adapter revision as parameters) — once, on this group, to keep the
    document small and the build fast;
  * ``qcnode slice N``: each assessed slice's score on its region (N: its Instance Number);
  * ``qcnode finding N``: a coded finding (kind → severity) on its region;
  * ``qcnode evidence N``: a measured value with its UCUM unit on its region.

  Each NUM also carries its SCOORD as INFERRED FROM (TID 300 → TID 320), because OHIF's
  measurement panel reads the coordinates from under the NUM. Each group also holds one
  TEXT DCM 121106 "Comment" that states the group in words (``Series quality 2.6 of 4
  (good)``): a text qualitative evaluation of the group's subject, which TID 1410 allows
  like TID 1501 rows 11–12 (CODE/TEXT) and TID 1411 rows 16–17; never under the NUM
  (TID 1419 / TID 300 have no TEXT row). OHIF's measurement panel shows it as the label.
- Regions: a group whose subject has no region of its own (the series score, a
  series-wide finding, a measurement over the whole image) gets a *marker*: a small box
  in the image's left margin, inset from the edges, one below the other for each
  such group on the same image, so that the viewer's labels never stack (OHIF writes a
  group's label at the right end of its region, half-way down). The tracking identifier
  says so (``[series]`` or ``[whole image]``) and :func:`sr_writer.parse_sr` reads such
  regions back as ``None``. The series group always uses a marker, so that its label is
  not hidden under the worst slice's own label. Not in the writer's hands: labels of
  two engine regions whose right ends and mid-heights nearly coincide still overlap,
  and a long label (DCM 112183's meaning) on a region near the image's right edge runs
  past a narrow viewport (OHIF 3.13 does not move SR labels inside the viewport).
- Qualitative Evaluations (UMLS C0034375, TID 1500): the score in words, the explanation
  (TEXT DCM 111412) and the descriptions and notes (TEXT DCM 121106, ``Finding N: …``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    CoordinatesForMeasurement,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementProperties,
    MeasurementReport,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset

from inference.result import AssessmentResult, EngineInfo, Region, SliceScore
from sr_writer import codes, prose
from sr_writer.document import (
    MANUFACTURER,
    document_attributes,
    library_order,
    observation_context,
    procedures,
    stamp,
)
from sr_writer.sources import check_sources
from sr_writer.uids import derive_uid

SR_SERIES_NUMBER: Final = 9901
SERIES_DESCRIPTION: Final = "Image quality report (qcnode)"
#: Tracking identifier prefixes and markers (parse.py reads them back).
SERIES_GROUP: Final = "qcnode series quality"
SLICE_GROUP: Final = "qcnode slice"
FINDING_GROUP: Final = "qcnode finding"
EVIDENCE_GROUP: Final = "qcnode evidence"
WHOLE: Final = "[whole image]"
SERIES_WIDE: Final = "[series]"
MODEL_PARAM: Final = "model revision: "
ADAPTER_PARAM: Final = "adapter revision: "
#: Marker box side, margin and half the vertical pitch, as a fraction of the smaller side.
MARKER_FRACTION: Final = 0.05


class _Ctx:
    """What every group builder needs: sources, job key, algorithm, markers placed."""

    def __init__(self, by_uid: dict[str, Dataset], job_key: str, engine: EngineInfo) -> None:
        self.by_uid = by_uid
        self.job_key = job_key
        self.algorithm = algorithm_identification(engine)
        self._markers: dict[tuple[str, int | None], int] = {}

    def image_region(
        self, region: Region | None, sop_uid: str, frame: int | None
    ) -> tuple[Region, bool]:
        """``region``, or a new marker box on ``sop_uid`` (second value True)."""
        if region is not None:
            return region, False
        return self.marker(sop_uid, frame), True

    def marker(self, sop_uid: str, frame: int | None) -> Region:
        """The next free marker box in the left margin of one frame of an image.

        Side and gap are ``MARKER_FRACTION`` of the smaller image side; the first marker
        sits three sides down (clear of the viewer's banners along the top), the next
        ones below it, then down the middle of the image when the margin is full.
        """
        ds = self.by_uid[sop_uid]
        rows, cols = int(ds.Rows), int(ds.Columns)
        side = max(1.0, float(round(MARKER_FRACTION * min(rows, cols))))
        pitch = 2 * side
        top = 3 * side
        per_column = max(1, int((rows - top) // pitch))
        k = self._markers.get((sop_uid, frame), 0)
        self._markers[(sop_uid, frame)] = k + 1
        column, row = divmod(k, per_column)
        x0 = side + (column % 2) * (cols // 2)
        y0 = top + row * pitch
        return Region.box(sop_uid, x0, y0, x0 + side, y0 + side, frame)


def algorithm_identification(engine: EngineInfo) -> AlgorithmIdentification:
    """TID 4019: engine name and version; model and adapter revisions as parameters."""
    params = []
    if engine.model_revision is not None:
        params.append(MODEL_PARAM + engine.model_revision)
    if engine.adapter_revision is not None:
        params.append(ADAPTER_PARAM + engine.adapter_revision)
    return AlgorithmIdentification(
        name=engine.name, version=engine.version, parameters=params or None,
        manufacturer=MANUFACTURER,
    )


def _source_image(region: Region, by_uid: dict[str, Dataset]) -> SourceImageForRegion:
    ds = by_uid[region.sop_instance_uid]
    frames = [region.frame] if region.frame is not None else None
    return SourceImageForRegion(str(ds.SOPClassUID), region.sop_instance_uid, frames)


def _scoords(
    region: Region, by_uid: dict[str, Dataset]
) -> tuple[ImageRegion, CoordinatesForMeasurement]:
    data = np.asarray(region.points, dtype=float)
    # 2D SCOORD has no POLYGON: a closed POLYLINE (first point repeated) is one (C.18.6.1.2).
    kind = "POLYLINE" if region.graphic_type == "POLYGON" else region.graphic_type
    group_level = ImageRegion(kind, data, _source_image(region, by_uid))
    under_num = CoordinatesForMeasurement(kind, data, _source_image(region, by_uid))
    return group_level, under_num


def _group(
    ctx: _Ctx,
    tracking: str,
    region: Region,
    measurements: Sequence[Measurement] = (),
    evaluations: Sequence[QualitativeEvaluation] = (),
    algorithm: AlgorithmIdentification | None = None,
    comment: str = "",
    tracking_key: str | None = None,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 group; every NUM gets the region again as INFERRED FROM SCOORD.

    ``comment`` becomes the group's TEXT DCM 121106 "Comment" (a text qualitative
    evaluation of the group's subject, see the module docstring). The Tracking UID is
    derived from ``tracking_key`` (default: the identifier ``tracking``).
    """
    image_region, under_num = _scoords(region, ctx.by_uid)
    key = tracking if tracking_key is None else tracking_key
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid(ctx.job_key, f"tracking|{key}"), identifier=tracking
        ),
        referenced_region=image_region,
        algorithm_id=algorithm,
        measurements=list(measurements) or None,
        qualitative_evaluations=list(evaluations) or None,
    )
    for item in group[0].ContentSequence:
        if item.ValueType == "NUM":
            item.ContentSequence = [*item.get("ContentSequence", []), under_num]
    if comment:
        group[0].ContentSequence.append(
            TextContentItem(codes.COMMENT, comment, RelationshipTypeValues.CONTAINS)
        )
    return group


def _score(value: float, uncertainty: float | None) -> Measurement:
    """DCM 111029 with its uncertainty as TID 310 "Measurement Properties".

    PS3.16 TID 300 row 8 is ``> HAS PROPERTIES INCLUDE DTID 310``; TID 310 row 5 is a
    NUM whose concept name comes from CID 225 (SCT 371886008 "+, range of upper
    measurement uncertainty", 371885007 "-, range of lower …"), and the rows of TID 310
    carry no relationship of their own: the including row's HAS PROPERTIES applies.
    highdicom's :class:`MeasurementProperties` encodes exactly that (checked against the
    current rows, tests/test_report_numbering.py), so no workaround is needed. TID 300
    is order-significant: these items (row 8) precede the SCOORD that :func:`_group`
    appends (row 13, TID 320). A template validator that matches them against TID 300
    row 2 ($ModType, HAS CONCEPT MOD) instead reports "expected HAS CONCEPT MOD"
    (highdicom PR #198): HAS CONCEPT MOD would be the non-standard encoding.
    """
    props = None
    if uncertainty is not None:
        props = MeasurementProperties(
            upper_measurement_uncertainty=uncertainty,
            lower_measurement_uncertainty=uncertainty,
        )
    return Measurement(
        name=codes.IMAGE_QUALITY_RATING, value=value, unit=codes.SCORE_UNIT, properties=props
    )


def _slice_tracking(s: SliceScore, numbers: prose.Numbers) -> str:
    """A slice group's Tracking Identifier, e.g. ``qcnode slice 116``: the slice's
    Instance Number, the number the viewer shows (``qcnode slice 4 frame 2`` for a frame;
    ``qcnode slice`` without an Instance Number). Its Tracking UID comes from the
    group's position, so that it stays unique either way."""
    number = numbers.get(s.sop_instance_uid)
    if number is None:
        return SLICE_GROUP
    return f"{SLICE_GROUP} {number}" + (f" frame {s.frame}" if s.frame is not None else "")


def _marked(base: str, whole: bool, series_wide: bool = False) -> str:
    if series_wide:
        return f"{base} {SERIES_WIDE}"
    return f"{base} {WHOLE}" if whole else base


def _groups(ctx: _Ctx, result: AssessmentResult, anchor: str) -> list[
    PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """All measurement groups; ``anchor`` is the worst (or first) slice's SOP UID."""
    worst = result.worst_slice
    marker = ctx.marker(anchor, worst.frame if worst else None)
    label = QualitativeEvaluation(codes.IMAGE_QUALITY, codes.quality_label(result.score))
    out = [_group(ctx, _marked(SERIES_GROUP, True, True), marker,
                  [_score(result.score, result.uncertainty)], [label], ctx.algorithm,
                  prose.series_label(result))]
    numbers = prose.instance_numbers(ctx.by_uid.values())
    for n, s in enumerate(result.slices, 1):
        region, whole = ctx.image_region(s.region, s.sop_instance_uid, s.frame)
        out.append(_group(ctx, _marked(_slice_tracking(s, numbers), whole), region,
                          [_score(s.score, s.uncertainty)],
                          comment=prose.slice_label(s, numbers),
                          tracking_key=f"{SLICE_GROUP} {n}"))
    for n, f in enumerate(result.findings, 1):
        region, whole = ctx.image_region(f.region, f.sop_instance_uid or anchor, None)
        tracking = _marked(f"{FINDING_GROUP} {n}", whole, f.sop_instance_uid is None)
        evaluation = QualitativeEvaluation(
            codes.FINDING_CODES[f.kind], codes.SEVERITY_CODES[f.severity]
        )
        out.append(_group(ctx, tracking, region, evaluations=[evaluation],
                          comment=prose.finding_label(f, numbers)))
    for n, m in enumerate(result.evidence, 1):
        region, whole = ctx.image_region(m.region, m.sop_instance_uid or anchor, None)
        tracking = _marked(f"{EVIDENCE_GROUP} {n}", whole, m.sop_instance_uid is None)
        name, site = codes.EVIDENCE_CODES[m.name]
        measurement = Measurement(
            name=name, value=m.value, unit=codes.unit_code(m.unit),
            finding_sites=[FindingSite(site)] if site is not None else None,
        )
        out.append(_group(ctx, tracking, region, [measurement],
                          comment=prose.evidence_label(m, numbers)))
    return out


def _qualitative_container(result: AssessmentResult) -> ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": score in words, explanation, comments."""
    items: list[CodeContentItem | TextContentItem] = [
        CodeContentItem(codes.IMAGE_QUALITY, codes.quality_label(result.score),
                        RelationshipTypeValues.CONTAINS)
    ]
    if result.explanation:
        items.append(TextContentItem(codes.NARRATIVE_SUMMARY, result.explanation,
                                     RelationshipTypeValues.CONTAINS))
    comments = [f"Finding {n}: {f.description}"
                for n, f in enumerate(result.findings, 1) if f.description]
    comments += [f"Evidence {n}: {m.description}"
                 for n, m in enumerate(result.evidence, 1) if m.description]
    comments += [f"Note {n}: {note}" for n, note in enumerate(result.notes, 1)]
    items += [TextContentItem(codes.COMMENT, c, RelationshipTypeValues.CONTAINS)
              for c in comments]
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(
    sources: Sequence[Dataset],
    result: AssessmentResult,
    *,
    job_key: str,
    predecessor: Dataset | None = None,
    created: datetime.datetime | None = None,
    series_number: int = SR_SERIES_NUMBER,
) -> Dataset:
    """Build the Comprehensive 3D SR (TID 1500) for ``result``.

    Parameters
    ----------
    sources
        The assessed slices' datasets (pixel data not needed); the first (after putting
        the worst slice first) gives patient and study identity.
    result
        The assessment.
    job_key
        The job's idempotency key; all UIDs are derived from it.
    predecessor
        An earlier SR this one supersedes (Predecessor Documents Sequence, PS3.3 C.17.2).
    created
        Content Date/Time and Instance Creation Date/Time (default: now). The same
        ``(job_key, created)`` and inputs give a byte-identical dataset; a retried or
        redelivered job must therefore pass the time stored with the job (not now) to
        re-create the SR it may already have sent, byte for byte.
    series_number
        Series Number of the SR's own series.

    Raises
    ------
    ValueError
        Invalid sources (see :func:`sr_writer.sources.check_sources`).
    """
    by_uid = check_sources(sources, result)
    ordered = library_order(sources, result)
    when = created or datetime.datetime.now()
    anchor = str(ordered[0].SOPInstanceUID)
    report = MeasurementReport(
        observation_context=observation_context(result.engine),
        procedure_reported=procedures(ordered),
        imaging_measurements=_groups(_Ctx(by_uid, job_key, result.engine), result, anchor),
        referenced_images=ordered,
    )
    report[0].ContentSequence.append(_qualitative_container(result))
    sr = hd.sr.Comprehensive3DSR(
        content=report[0],
        **document_attributes(ordered, job_key=job_key, role="sr",
                              series_number=series_number,
                              series_description=SERIES_DESCRIPTION,
                              predecessor=predecessor, when=when),
    )
    stamp(sr, when)
    return sr


