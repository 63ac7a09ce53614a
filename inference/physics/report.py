"""Assemble the physics engine's :class:`AssessmentResult`: slice scores, coded findings
with regions, evidence (:class:`Measurement`) and a plain-words explanation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from inference.physics.measures import Box, SliceMeasures, body_threshold
from inference.physics.scoring import (
    ScoreThresholds,
    noise_words,
    series_score,
    severity,
    slice_score,
)
from inference.prepare import PreparedSeries, PreparedSlice
from inference.result import (
    AssessmentResult,
    EngineInfo,
    Finding,
    FindingKind,
    Measurement,
    Region,
    Severity,
    SliceScore,
    score_label,
)

#: Fraction of the image border covered by body above which the field of view is cut.
TRUNCATION_BORDER = (0.05, 0.2, 0.4)


@dataclass(frozen=True)
class _Scored:
    slice: PreparedSlice
    m: SliceMeasures
    noise: float
    score: float
    uncertainty: float

    @property
    def name(self) -> str:
        """The slice as texts name it: its Instance Number (``slice 11``)."""
        return self.slice.name

    def region(self, box: Box | None) -> Region | None:
        if box is None:
            return None
        return Region.box(self.slice.sop_instance_uid, *box, frame=self.slice.frame)


def _score_slices(series: PreparedSeries, measures: Sequence[SliceMeasures],
                  t: ScoreThresholds) -> list[_Scored]:
    scored = []
    for s, m in zip(series.slices, measures, strict=True):
        if m.noise.sd_hu is None:
            continue  # no soft tissue on this slice (e.g. outside the body)
        score, unc = slice_score(m.noise.sd_hu, m.streak.index_hu, m.edge.width_mm, t)
        scored.append(_Scored(s, m, m.noise.sd_hu, score, unc))
    if not scored:
        raise ValueError(
            f"series {series.series_instance_uid}: no soft tissue (0–150 HU) found on the "
            "selected slices, so noise cannot be measured"
        )
    return scored


def _truncation(series: PreparedSeries) -> tuple[float, PreparedSlice]:
    worst = (0.0, series.slices[0])
    for s in series.slices:
        border = np.concatenate([s.hu[0], s.hu[-1], s.hu[:, 0], s.hu[:, -1]])
        frac = float((border > body_threshold(s.hu_range)).mean())
        worst = max(worst, (frac, s), key=lambda x: x[0])
    return worst


def _noise(scored: list[_Scored], t: ScoreThresholds) -> tuple[list[Finding], list[Measurement],
                                                               str]:
    mid = _median_item_by(scored, lambda x: x.noise)
    worst = max(scored, key=lambda x: x.noise)
    evidence = [Measurement(
        "noise_hu", mid.noise, "[hnsf'U]",
        f"typical noise in soft tissue (0–150 HU) over small patches, median {mid.name}",
        mid.slice.sop_instance_uid, mid.region(mid.m.noise.box),
    )]
    fat = [x for x in scored if x.m.fat_noise.sd_hu is not None]
    fat_text = ""
    if fat:
        fmid = _median_item_by(fat, lambda x: x.m.fat_noise.sd_hu or 0.0)
        fat_sd = fmid.m.fat_noise.sd_hu or 0.0
        evidence.append(Measurement(
            "noise_fat_hu", fat_sd, "[hnsf'U]",
            f"typical noise in fat (−300–0 HU) over small patches, median {fmid.name}",
            fmid.slice.sop_instance_uid, fmid.region(fmid.m.fat_noise.box),
        ))
        fat_text = f"; {fat_sd:.1f} HU in fat"
    text = (f"Noise {mid.noise:.1f} HU in soft tissue (median of {len(scored)} slices"
            f"{fat_text}), {noise_words(mid.noise, t)}")
    if worst.noise > 1.15 * mid.noise:
        text += f"; highest {worst.noise:.1f} HU at {worst.name}"
    findings = []
    level = severity(mid.noise, t.noise_severity_hu)
    if level is not Severity.NONE:
        findings.append(Finding(
            FindingKind.NOISE, level,
            f"noise {mid.noise:.1f} HU in soft tissue (highest {worst.noise:.1f} HU, "
            f"{worst.name})",
            worst.slice.sop_instance_uid, worst.region(worst.m.noise.box),
        ))
    return findings, evidence, text + "."


def _streaks(scored: list[_Scored], t: ScoreThresholds) -> tuple[list[Finding],
                                                                 list[Measurement], str]:
    worst = max(scored, key=lambda x: x.m.streak.index_hu)
    value = worst.m.streak.index_hu
    hit = [x for x in scored if severity(x.m.streak.index_hu, t.streak_severity_hu)
           is not Severity.NONE]
    if not hit:
        dense = [x for x in scored if x.m.streak.dense_pixels]
        if dense and all(x.m.streak.clipped for x in dense):
            return [], [], (
                f"Bone or metal (at the window's top, which cannot tell them apart) on "
                f"{len(dense)} slice(s); streak index {value:.1f} HU in the soft tissue "
                f"around it at {worst.name}, below a notable level.")
        if dense:
            return [], [], f"Dense material on {len(dense)} slice(s) without notable streaks."
        return [], [], "No dense material, no streaks."
    slices = _names(hit)
    evidence = [Measurement(
        "streak_index_hu", value, "[hnsf'U]",
        f"noise added around dense material (above 2000 HU) on top of the usual noise, "
        f"{worst.name}",
        worst.slice.sop_instance_uid, worst.region(worst.m.streak.box),
    )]
    finding = Finding(
        FindingKind.METAL_ARTIFACT, severity(value, t.streak_severity_hu),
        f"streaks from dense material at {slices}; streak index {value:.1f} HU at "
        f"{worst.name}",
        worst.slice.sop_instance_uid, worst.region(worst.m.streak.box),
    )
    text = (f"Streaks from dense material at {slices} (streak index {value:.1f} HU "
            f"at {worst.name}).")
    return [finding], evidence, text


def _edge_and_contrast(scored: list[_Scored], t: ScoreThresholds) -> tuple[
        list[Finding], list[Measurement], str]:
    findings: list[Finding] = []
    evidence: list[Measurement] = []
    parts = []
    edges = [x for x in scored if x.m.edge.width_mm is not None]
    if edges:
        e = _median_item_by(edges, lambda x: x.m.edge.width_mm or 0.0)
        width, f50 = e.m.edge.width_mm or 0.0, e.m.edge.mtf50_per_mm or 0.0
        evidence += [
            Measurement("edge_width_mm", width, "mm",
                        f"width of the skin–air edge (10–90 % rise), {e.name}",
                        e.slice.sop_instance_uid),
            Measurement("mtf50_per_mm", f50, "/mm", "from the skin–air edge (Gaussian model)",
                        e.slice.sop_instance_uid),
        ]
        level = severity(width, t.blur_severity_mm)
        parts.append(f"Skin–air edge width {width:.1f} mm (MTF50 {f50:.2f} /mm): "
                     + ("sharp" if level is Severity.NONE else f"{level} blur"))
        if level is not Severity.NONE:
            findings.append(Finding(FindingKind.BLUR, level, f"edge width {width:.1f} mm",
                                    e.slice.sop_instance_uid))
    contrasts = [x for x in scored if x.m.cnr is not None]
    if contrasts:
        c = _median_item_by(contrasts, lambda x: x.m.cnr or 0.0)
        cnr, contrast = c.m.cnr or 0.0, c.m.contrast_hu or 0.0
        region = c.region(c.m.noise.box)
        evidence += [
            Measurement("contrast_hu", contrast, "[hnsf'U]",
                        f"soft tissue minus fat, {c.name}", c.slice.sop_instance_uid, region),
            Measurement("cnr", cnr, "1", "soft tissue vs fat, over soft-tissue noise",
                        c.slice.sop_instance_uid, region),
        ]
        parts.append(f"soft tissue–fat contrast {contrast:.1f} HU, CNR {cnr:.1f}")
        level = severity(cnr, t.cnr_severity, lower_is_worse=True)
        if level is not Severity.NONE:
            findings.append(Finding(FindingKind.LOW_CONTRAST, level, f"CNR {cnr:.1f}",
                                    c.slice.sop_instance_uid))
    return findings, evidence, ("; ".join(parts) + ".") if parts else ""


def _names(items: list[_Scored]) -> str:
    """``slice 12``, ``slices 3, 9 and 12`` (by Instance Number), else each plane's name."""
    numbers = [x.slice.instance_number for x in items]
    if all(n is not None for n in numbers) and all(x.slice.frame is None for x in items):
        ordered = [str(n) for n in sorted(n for n in numbers if n is not None)]
        if len(ordered) == 1:
            return f"slice {ordered[0]}"
        return f"slices {', '.join(ordered[:-1])} and {ordered[-1]}"
    return ", ".join(x.name for x in items)


def _median_item_by(items: list[_Scored], key: Callable[[_Scored], float]) -> _Scored:
    ordered = sorted(items, key=key)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class _Described:
    """Everything of a series result but its score: the scored slices, findings,
    evidence and the measurement sentences."""

    scored: list[_Scored]
    findings: list[Finding]
    evidence: list[Measurement]
    texts: list[str]

    def measurements_text(self) -> str:
        return " ".join(t for t in self.texts if t)


def _describe(series: PreparedSeries, measures: Sequence[SliceMeasures],
              t: ScoreThresholds) -> _Described:
    scored = _score_slices(series, measures, t)
    out = _Described(scored, [], [], [])
    for part in (_noise, _streaks, _edge_and_contrast):
        f, e, text = part(scored, t)
        out.findings.extend(f)
        out.evidence.extend(e)
        out.texts.append(text)
    frac, cut = _truncation(series)
    level = severity(frac, TRUNCATION_BORDER)
    if level is not Severity.NONE:
        out.findings.append(Finding(FindingKind.TRUNCATED_FOV, level,
                                    f"body reaches {frac:.0%} of the image border",
                                    cut.sop_instance_uid))
        out.texts.append(f"The body is cut by the field of view at {cut.name}.")
    return out


def describe_measurements(series: PreparedSeries, measures: Sequence[SliceMeasures],
                          t: ScoreThresholds) -> str:
    """The measurements in plain words — noise, streaks, edge sharpness, contrast, field
    of view — without the engine's score sentence (:func:`build_result` adds that).

    For text that must not carry a competing score, e.g. training explanations.
    """
    return _describe(series, measures, t).measurements_text()


@dataclass(frozen=True)
class Evidence:
    """The physics measurements of a series without a score: for another engine's result
    (the VLM's words stand beside these numbers)."""

    text: str
    findings: tuple[Finding, ...]
    measurements: tuple[Measurement, ...]


def evidence(series: PreparedSeries, measures: Sequence[SliceMeasures],
             t: ScoreThresholds) -> Evidence:
    """The measurements in words, as coded findings and as evidence items."""
    described = _describe(series, measures, t)
    return Evidence(described.measurements_text(), tuple(described.findings),
                    tuple(described.evidence))


def build_result(series: PreparedSeries, measures: Sequence[SliceMeasures],
                 t: ScoreThresholds, info: EngineInfo) -> AssessmentResult:
    """The series result from per-slice measures (same order as ``series.slices``)."""
    described = _describe(series, measures, t)
    scored = described.scored
    score, uncertainty = series_score([x.score for x in scored],
                                      [x.uncertainty for x in scored], t)
    score_text = (f"Score {score:.1f} of 4 ({score_label(score)}), from {len(scored)} of "
                  f"{series.total_slices} slices.")
    return AssessmentResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        score=score, uncertainty=uncertainty,
        explanation=f"{described.measurements_text()} {score_text}", engine=info,
        slices=tuple(SliceScore(x.slice.sop_instance_uid, x.score, x.uncertainty,
                                x.slice.frame) for x in scored),
        findings=tuple(described.findings), evidence=tuple(described.evidence),
        notes=series.notes,
    )
