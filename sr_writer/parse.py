"""Reading a qcnode SR back into an :class:`~inference.result.AssessmentResult`.

The inverse of :func:`sr_writer.tid1500.build_sr`, through highdicom's ``from_dataset`` /
``from_sequence`` (TID 1500 → TID 1410 groups). The groups are told apart by their
tracking identifiers; regions marked ``[whole image]`` were filled in by the writer and
read back as ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import highdicom as hd
from highdicom.sr import MeasurementReport, PlanarROIMeasurementsAndQualitativeEvaluations
from pydicom.dataset import Dataset

from inference.result import (
    AssessmentResult,
    EngineInfo,
    Finding,
    GraphicType,
    Measurement,
    Region,
    SliceScore,
)
from sr_writer import codes
from sr_writer import tid1500 as t

_COMMENT = re.compile(r"^(Finding|Evidence|Note) (\d+): (.*)$", re.DOTALL)
_GROUP = re.compile(
    r"^(qcnode [a-z ]+?)(?: (\d+)(?: frame \d+)?)?(?: (\[whole image\]|\[series\]))?$")
Group = PlanarROIMeasurementsAndQualitativeEvaluations


def _items(ds: Any) -> Iterable[Any]:
    return ds.get("ContentSequence", []) if hasattr(ds, "get") else []


def _code_of(item: Any) -> tuple[str, str]:
    seq = item.ConceptNameCodeSequence[0]
    return str(seq.CodeValue), str(seq.CodingSchemeDesignator)


def _is(item: Any, code: hd.sr.CodedConcept) -> bool:
    return _code_of(item) == (code.value, code.scheme_designator)


def _region(group: Group, whole: bool) -> Region | None:
    roi = group.roi
    if whole or roi is None:
        return None
    ref = roi.ContentSequence[0].ReferencedSOPSequence[0]
    frames = ref.get("ReferencedFrameNumber")
    frame = int(frames[0] if isinstance(frames, list | tuple) else frames) if frames else None
    pts = tuple((float(c), float(r)) for c, r in roi.value)
    kind: GraphicType = roi.graphic_type.value
    if kind == "POLYLINE" and len(pts) >= 4 and pts[0] == pts[-1]:
        kind = "POLYGON"
    return Region(str(ref.ReferencedSOPInstanceUID), kind, pts, frame)


def _roi_uid(group: Group) -> str:
    roi = group.roi
    if roi is None:
        raise ValueError("measurement group without an image region")
    return str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _roi_frame(group: Group) -> int | None:
    roi = group.roi
    ref = roi.ContentSequence[0].ReferencedSOPSequence[0] if roi is not None else Dataset()
    frames = ref.get("ReferencedFrameNumber")
    if not frames:
        return None
    return int(frames[0] if isinstance(frames, list | tuple) else frames)


def _score(group: Group) -> tuple[float, float | None]:
    for m in group.get_measurements(name=codes.IMAGE_QUALITY_RATING):
        uncertainty = None
        for child in _items(m[0]):
            if child.ValueType == "NUM" and _is(child, codes.UPPER_UNCERTAINTY):
                uncertainty = float(child.MeasuredValueSequence[0].NumericValue)
        return float(m.value), uncertainty
    raise ValueError("quality group without an Image Quality Rating")


def _engine(group: Group) -> EngineInfo:
    values: dict[str, list[str]] = {}
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT":
            values.setdefault(_code_of(item)[0], []).append(str(item.TextValue))
    params = values.get("111002", [])

    def param(prefix: str) -> str | None:
        return next((p[len(prefix):] for p in params if p.startswith(prefix)), None)

    return EngineInfo(
        name=values["111001"][0], version=values["111003"][0],
        model_revision=param(t.MODEL_PARAM), adapter_revision=param(t.ADAPTER_PARAM),
    )


def _finding(group: Group, marker: str | None, description: str) -> Finding:
    evaluation = group.get_qualitative_evaluations()[0]
    name, value = evaluation.name, evaluation.value
    kind = next(k for k, c in codes.FINDING_CODES.items() if codes.same_code(name, c))
    severity = next(s for s, c in codes.SEVERITY_CODES.items() if codes.same_code(value, c))
    return Finding(
        kind, severity, description,
        None if marker == t.SERIES_WIDE else _roi_uid(group),
        _region(group, marker is not None),
    )


def _same_site(site: object, expected: hd.sr.CodedConcept | None) -> bool:
    if expected is None:
        return site is None
    return codes.same_code(site, expected)


def _evidence(group: Group, marker: str | None, description: str) -> Measurement:
    m = group.get_measurements()[0]
    sites = m.finding_sites
    site = sites[0].value if sites else None
    key = next(
        k for k, (name, s) in codes.EVIDENCE_CODES.items()
        if codes.same_code(m.name, name) and _same_site(site, s)
    )
    return Measurement(
        key, float(m.value), str(m.unit.value), description,
        None if marker == t.SERIES_WIDE else _roi_uid(group),
        _region(group, marker is not None),
    )


def _qualitative(report: MeasurementReport) -> tuple[str, dict[tuple[str, int], str]]:
    explanation, comments = "", {}
    for item in report[0].ContentSequence:
        if item.ValueType != "CONTAINER" or not _is(item, codes.QUALITATIVE_EVALUATIONS):
            continue
        for child in item.ContentSequence:
            if child.ValueType != "TEXT":
                continue
            text = str(child.TextValue)
            if _is(child, codes.NARRATIVE_SUMMARY):
                explanation = text
            elif (match := _COMMENT.match(text)) is not None:
                comments[(match[1], int(match[2]))] = match[3]
    return explanation, comments


def parse_sr(ds: Dataset) -> AssessmentResult:
    """The :class:`AssessmentResult` an SR made by :func:`build_sr` holds.

    Raises
    ------
    ValueError
        ``ds`` is not a TID 1500 report made by qcnode.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = MeasurementReport.from_sequence(sr.content)
    explanation, comments = _qualitative(report)
    parts: dict[str, Any] = {"slices": [], "findings": [], "evidence": []}
    for group in report.get_planar_roi_measurement_groups():
        match = _GROUP.match(group.tracking_identifier or "")
        if match is None:
            continue
        kind, n, marker = match[1], int(match[2] or 0), match[3]
        if kind == t.SERIES_GROUP:
            parts["score"], parts["uncertainty"] = _score(group)
            parts["engine"] = _engine(group)
        elif kind == t.SLICE_GROUP:
            score, unc = _score(group)
            parts["slices"].append(SliceScore(
                _roi_uid(group), score, unc, _roi_frame(group), _region(group, marker is not None)
            ))
        elif kind == t.FINDING_GROUP:
            parts["findings"].append(_finding(group, marker, comments.get(("Finding", n), "")))
        elif kind == t.EVIDENCE_GROUP:
            parts["evidence"].append(_evidence(group, marker, comments.get(("Evidence", n), "")))
    if "score" not in parts:
        raise ValueError("not a qcnode quality report: no series quality group")
    notes = tuple(v for (k, _), v in sorted(comments.items()) if k == "Note")
    return AssessmentResult(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=_assessed_series(ds),
        score=parts["score"], uncertainty=parts["uncertainty"], explanation=explanation,
        engine=parts["engine"], slices=tuple(parts["slices"]),
        findings=tuple(parts["findings"]), evidence=tuple(parts["evidence"]), notes=notes,
    )


def _assessed_series(ds: Dataset) -> str:
    """The assessed series: the one in Current Requested Procedure Evidence."""
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            return str(series.SeriesInstanceUID)
    raise ValueError("SR names no evidence series")
