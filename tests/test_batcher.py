"""Batching across series in a gpu worker (inference.batcher) on the tiny random Gemma 3:
concurrent callers' series assessed in one engine call, each result back to its caller."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inference.batcher import SeriesBatcher
from inference.physics import PhysicsEngine
from inference.prepare import PreparedSeries
from inference.result import AssessmentResult
from inference.vlm import VlmEngine
from tests.support.prepared import random_series


def _concurrently(batcher: SeriesBatcher, batch: list[PreparedSeries]
                  ) -> list[AssessmentResult | BaseException]:
    out: list[AssessmentResult | BaseException] = [RuntimeError("not run")] * len(batch)

    def call(i: int) -> None:
        try:
            out[i] = batcher.assess(batch[i])
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


@pytest.fixture(scope="module")
def engine(tiny_gemma_dir: Path) -> VlmEngine:
    return VlmEngine(tiny_gemma_dir, device="cpu", max_batch=8)


def test_concurrent_series_share_the_engine_call_and_get_their_own_results(
    engine: VlmEngine,
) -> None:
    batch = [random_series(2, seed=30 + i, series=40 + i) for i in range(4)]
    batcher = SeriesBatcher(engine, max_series=4, max_wait=30.0)  # 4 arrive: no waiting
    sizes: list[int] = []
    handle = engine.loaded.model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    try:
        results = _concurrently(batcher, batch)
    finally:
        handle.remove()
    assert sizes[0] == 8  # one read-out pass over the 2 slices of each of the 4 series
    for series, result in zip(batch, results, strict=True):
        assert isinstance(result, AssessmentResult)
        assert result.series_instance_uid == series.series_instance_uid
        alone = engine.assess(series)
        assert result.score == pytest.approx(alone.score, abs=1e-5)


def test_a_series_without_companions_goes_alone_after_the_wait(engine: VlmEngine) -> None:
    batcher = SeriesBatcher(engine, max_series=4, max_wait=0.2)
    series = random_series(2, seed=50, series=60)
    (result,) = _concurrently(batcher, [series])
    assert isinstance(result, AssessmentResult)
    assert result.series_instance_uid == series.series_instance_uid


def test_one_bad_series_fails_only_its_own_caller(engine: VlmEngine) -> None:
    good = random_series(2, seed=70, series=80)
    empty = PreparedSeries(good.study_instance_uid, "1.2.826.0.1.3680043.8.498.999", "CT",
                           "", (), 0)
    batcher = SeriesBatcher(engine, max_series=2, max_wait=30.0)
    ok, bad = _concurrently(batcher, [good, empty])
    assert isinstance(ok, AssessmentResult)
    assert isinstance(bad, ValueError) and "no prepared slices" in str(bad)


def test_engines_without_assess_many_are_called_per_series() -> None:
    batcher = SeriesBatcher(PhysicsEngine(), max_series=3, max_wait=30.0)
    batch = [random_series(1, seed=i, series=90 + i) for i in range(3)]
    results = _concurrently(batcher, batch)
    # random RGB over zero HU has no soft tissue: physics refuses each, each gets its own
    assert all(isinstance(r, ValueError) and "no soft tissue" in str(r) for r in results)
