"""Physics engine on `qcnode synth` output: dose ordering, noise accuracy, metal streaks."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from inference.engine import create_engine
from inference.physics import PhysicsEngine
from inference.physics.measures import measure_slice
from inference.prepare import prepare_series
from inference.result import FindingKind
from inference.synth import SeriesTruth, SynthSpec, synthesize

DOSES = (1.0, 0.5, 0.25, 0.125, 0.0625)


@pytest.fixture(scope="module")
def dose_series(tmp_path_factory) -> tuple[Path, list[SeriesTruth]]:
    out = tmp_path_factory.mktemp("dose")
    return out, synthesize(SynthSpec(dose_levels=DOSES, slices=4, size=512, seed=3), out)


@pytest.fixture(scope="module")
def metal_series(tmp_path_factory) -> tuple[Path, SeriesTruth]:
    out = tmp_path_factory.mktemp("metal")
    truths = synthesize(SynthSpec(artifacts=("metal",), slices=6, size=512, seed=4), out)
    return out / "dose1_metal", truths[0]


def _folder(out: Path, dose: float) -> Path:
    return out / f"dose{dose:.3g}"


def test_score_falls_monotonically_with_dose(dose_series) -> None:
    out, truths = dose_series
    engine = create_engine("physics")
    scores = [engine.assess(prepare_series([_folder(out, t.dose)], k=4)).score for t in truths]
    rho = spearmanr([t.dose for t in truths], scores).statistic
    assert rho >= 0.9, (scores, rho)
    assert scores[0] > scores[-1] + 2.0


def test_measured_noise_matches_simulated_noise(dose_series) -> None:
    out, truths = dose_series
    for truth in truths:
        series = prepare_series([_folder(out, truth.dose)], k=4)
        measured = np.median(
            [measure_slice(s.hu, s.pixel_spacing).noise.sd_hu for s in series.slices]
        )
        assert abs(measured / truth.simulated_noise_hu - 1) < 0.10, (
            truth.dose, measured, truth.simulated_noise_hu)


def test_clean_slice_noise_matches_truth_slice_by_slice(metal_series) -> None:
    folder, truth = metal_series
    assert [i for i, sd in enumerate(truth.slice_noise_hu) if sd is None] == truth.metal_slices
    expected = dict(zip(truth.sop_instance_uids, truth.slice_noise_hu, strict=True))
    checked = 0
    for s in prepare_series([folder], k=6).slices:
        simulated = expected[s.sop_instance_uid]
        if simulated is None:
            continue
        measured = measure_slice(s.hu, s.pixel_spacing).noise.sd_hu
        assert measured is not None and abs(measured / simulated - 1) < 0.15, (
            s.sop_instance_uid, measured, simulated)
        checked += 1
    assert checked == len(truth.sop_instance_uids) - len(truth.metal_slices)


def test_metal_streaks_found_where_they_were_put(metal_series) -> None:
    folder, truth = metal_series
    result = create_engine("physics").assess(prepare_series([folder], k=6))
    metal = [f for f in result.findings if f.kind is FindingKind.METAL_ARTIFACT]
    assert len(metal) == 1
    finding = metal[0]
    metal_uids = {truth.sop_instance_uids[i] for i in truth.metal_slices}
    assert finding.sop_instance_uid in metal_uids
    assert finding.region is not None
    cols = [p[0] for p in finding.region.points]
    rows = [p[1] for p in finding.region.points]
    for col, row in truth.metal_centres_px:
        assert min(cols) <= col <= max(cols) and min(rows) <= row <= max(rows)
    streak = {m.name: m for m in result.evidence}["streak_index_hu"]
    assert streak.value > 15 and streak.sop_instance_uid in metal_uids
    assert "streaks from dense material" in result.explanation.lower()
    # slices without metal carry no streak index
    clean = [s for s in result.slices if s.sop_instance_uid not in metal_uids]
    worst_metal = min(s.score for s in result.slices if s.sop_instance_uid in metal_uids)
    assert clean and min(s.score for s in clean) > worst_metal


def test_deterministic_and_fast(dose_series) -> None:
    out, _ = dose_series
    series = prepare_series([_folder(out, 0.25)], k=2)
    engine = create_engine("physics")
    first = engine.assess(series)
    assert engine.assess(series) == first
    hu, spacing = series.slices[0].hu, series.slices[0].pixel_spacing
    start = time.process_time()
    measure_slice(hu, spacing)
    assert time.process_time() - start < 1.0
    assert first.explanation.startswith("Noise ")
    names = {m.name for m in first.evidence}
    assert {"noise_hu", "noise_fat_hu", "edge_width_mm", "cnr"} <= names


def test_describe_is_the_explanation_without_its_score_sentence(dose_series) -> None:
    out, _ = dose_series
    series = prepare_series([_folder(out, 0.0625)], k=2)
    engine = PhysicsEngine()
    text, result = engine.describe(series), engine.assess(series)
    assert text.startswith("Noise ") and "HU" in text
    assert not re.search(r"\b(score|rating|rated)\b", text, re.IGNORECASE)
    assert result.explanation.startswith(text + " Score ")
    assert result.explanation.count("Score") == 1
