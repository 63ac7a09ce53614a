from __future__ import annotations

import sys

import pytest

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


def _result() -> AssessmentResult:
    region = Region.box("1.2.3.4.1", 10, 20, 60, 80)
    return AssessmentResult(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        score=2.6,
        uncertainty=0.4,
        explanation="Noise 22 HU in soft tissue — höher als üblich; ノイズ",
        engine=EngineInfo("physics", "0.1.0"),
        slices=(SliceScore("1.2.3.4.1", 2.0, 0.5, region=region), SliceScore("1.2.3.4.2", 3.2)),
        findings=(Finding(FindingKind.NOISE, Severity.MODERATE, "noise", "1.2.3.4.1", region),),
        evidence=(Measurement("noise_hu", 22.4, "[hnsf'U]", "soft tissue", "1.2.3.4.1", region),),
    )


def test_json_round_trip() -> None:
    result = _result()
    assert AssessmentResult.from_json(result.to_json()) == result
    assert result.worst_slice is not None and result.worst_slice.score == 2.0
    assert result.label == "good"


def test_score_outside_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the 0–4"):
        SliceScore("1.2", 4.5)
    with pytest.raises(ValueError):
        score_label(float("nan"))


def test_unknown_measurement_refused() -> None:
    with pytest.raises(ValueError, match="unknown measurement"):
        Measurement("weight", 1.0, "kg")


def test_result_module_does_not_import_torch() -> None:
    assert "inference.result" in sys.modules
    import subprocess

    code = "import sys, inference.result; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
