"""Agreement metrics against hand-computed values, ties and degenerate inputs."""

from __future__ import annotations

import json
import math

import pytest

from inference.metrics import (
    DegenerateInputError,
    agreement,
    bootstrap_ci,
    calibration_table,
    krocc,
    mae,
    plcc,
    rmse,
    srcc,
)

TRUE = [0.0, 1.0, 2.0, 3.0, 4.0]
PRED = [0.0, 2.0, 1.0, 3.0, 4.0]  # one swapped pair


def test_hand_computed_values() -> None:
    # Spearman: 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/120 = 0.9; the values are ranks, so PLCC too.
    assert srcc(TRUE, PRED) == pytest.approx(0.9)
    assert plcc(TRUE, PRED) == pytest.approx(0.9)
    # Kendall: 10 pairs, 1 discordant → (9 - 1)/10.
    assert krocc(TRUE, PRED) == pytest.approx(0.8)
    assert mae(TRUE, PRED) == pytest.approx(0.4)
    assert rmse(TRUE, PRED) == pytest.approx(math.sqrt(0.4))


def test_pearson_on_non_rank_values() -> None:
    t = [1.0, 2.0, 3.0]
    p = [1.0, 2.0, 4.0]
    # dt = (-1, 0, 1), dp = (-4/3, -1/3, 5/3): Σdt·dp = 3; Σdt² = 2; Σdp² = 42/9.
    assert plcc(t, p) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert srcc(t, p) == pytest.approx(1.0)


def test_ties_on_both_sides() -> None:
    t = [1.0, 1.0, 2.0, 3.0]
    p = [1.0, 2.0, 2.0, 3.0]
    # tau-b: C=4, D=0, one pair tied only in t, one only in p → 4/sqrt(5·5).
    assert krocc(t, p) == pytest.approx(0.8)
    # average ranks t (1.5,1.5,3,4), p (1,2.5,2.5,4) → 3.75/4.5.
    assert srcc(t, p) == pytest.approx(3.75 / 4.5)


def test_constant_predictions_give_a_message_not_nan() -> None:
    with pytest.raises(DegenerateInputError, match="predictions are constant"):
        srcc(TRUE, [2.0] * 5)
    with pytest.raises(DegenerateInputError, match="reference scores are constant"):
        plcc([3.0] * 5, PRED)
    report = agreement(TRUE, [2.0] * 5, n_boot=200, seed=1)
    assert report.srcc.value is None and report.aggregate.value is None
    assert "predictions are constant (all 2)" in report.srcc.fmt()
    assert any("constant" in n for n in report.notes)
    assert report.mae.value == pytest.approx(1.2)
    text = json.dumps(report.to_dict(), allow_nan=False)  # raises on any NaN
    assert "NaN" not in text


def test_aggregate_and_bootstrap_are_seeded() -> None:
    t = [0.2 * i for i in range(21)]
    p = [v + (0.3 if i % 3 == 0 else -0.2) for i, v in enumerate(t)]
    a = agreement(t, p, n_boot=300, seed=7)
    b = agreement(t, p, n_boot=300, seed=7)
    c = agreement(t, p, n_boot=300, seed=8)
    assert a == b
    assert a.srcc.low != c.srcc.low or a.srcc.high != c.srcc.high
    assert a.aggregate.value == pytest.approx(
        abs(plcc(t, p)) + abs(srcc(t, p)) + abs(krocc(t, p))
    )
    for est in (a.srcc, a.plcc, a.krocc, a.mae, a.rmse, a.aggregate):
        assert est.value is not None and est.low is not None and est.high is not None
        assert est.low <= est.value <= est.high or math.isclose(est.low, est.value)


def test_bootstrap_of_a_constant_metric_is_degenerate() -> None:
    assert bootstrap_ci([1.0, 2.0], [1.0, 1.0], srcc, n_boot=50) is None


def test_calibration_table() -> None:
    rows = calibration_table([1.0, 1.4, 3.0, 4.0], [1.2, 0.8, 2.6, 3.9])
    by_class = {r.predicted_class: r for r in rows}
    assert by_class[1].n == 2
    assert by_class[1].mean_reference == pytest.approx(1.2)
    assert by_class[1].mean_error == pytest.approx(-0.2)
    assert by_class[3].n == 1 and by_class[4].n == 1 and by_class[0].n == 0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        mae([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        mae([1.0], [float("nan")])
    with pytest.raises(DegenerateInputError, match="no pairs"):
        mae([], [])
