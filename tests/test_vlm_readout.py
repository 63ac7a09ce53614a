"""The score read-out on the tiny random Gemma 3: the decimal digit, the card's answer
format, batch bounds, and the bias a digit-only read-out had.

The expected values are checked against plain, unbatched forward passes (one per
continuation), computed here by hand from the text ``… Score: d.``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image

from inference.card import ModelCard
from inference.engine import EngineError
from inference.prepare import PreparedSeries
from inference.vlm import VlmEngine
from inference.vlm.prompting import prompt_text, to_image
from inference.vlm.readout import SliceReadout
from tests.support.prepared import random_series
from tests.support.tiny_gemma import tiny_card

DIGITS = list("0123456789")


def _series(n: int, seed: int = 3) -> PreparedSeries:
    return random_series(n, seed=seed, series=2)


@pytest.fixture(scope="module")
def engine(tiny_gemma_dir: Path) -> VlmEngine:
    return VlmEngine(tiny_gemma_dir, device="cpu")


def _next_token_probs(
    model: Any, processor: Any, text: str, image: Image.Image, tokens: list[str]
) -> NDArray[np.float64]:
    """Softmax over ``tokens`` at the last position of one plain, unbatched forward pass."""
    ids = processor.tokenizer.convert_tokens_to_ids(tokens)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double().numpy()[ids]
    p = np.exp(logits - logits.max())
    return np.asarray(p / p.sum(), dtype=np.float64)


def test_expected_score_equals_hand_expectation_over_digit_and_decimal(
    engine: VlmEngine,
) -> None:
    series = _series(3)
    readouts = engine.read_slices(series.slices)
    lm = engine.loaded
    prompt = prompt_text(lm.processor, engine.card) + "Score: "
    for sl, readout in zip(series.slices, readouts, strict=True):
        image = to_image(sl.rgb)
        p_digit = _next_token_probs(lm.model, lm.processor, prompt, image, DIGITS[:5])
        bins: dict[float, float] = {4.0: float(p_digit[4])}  # "4.0" is the only 4
        expected = 4.0 * p_digit[4]
        for d in range(4):
            p_dec = _next_token_probs(lm.model, lm.processor, f"{prompt}{d}.", image, DIGITS)
            expected += p_digit[d] * (d + float((p_dec * np.arange(10)).sum()) / 10)
            bins.update({round(d + e / 10, 1): float(p_digit[d] * p_dec[e]) for e in range(10)})
        values = np.array(sorted(bins))
        probs = np.array([bins[v] for v in values])
        std = float(np.sqrt((probs * (values - expected) ** 2).sum()))
        assert readout.expected == pytest.approx(expected, abs=1e-5)
        assert readout.std == pytest.approx(std, abs=1e-5)
        np.testing.assert_allclose(readout.values, values, atol=1e-12)
        np.testing.assert_allclose(readout.probabilities, probs, atol=1e-5)
        assert len(readout.values) == 41 and sum(readout.probabilities) == pytest.approx(1.0)
        # the decimal adds Σ_d p(d)·E[e|d]/10 to the digit-only expectation
        assert readout.expected > readout.digit_expected + 1e-3


def test_the_cards_answer_format_decides_whether_a_decimal_is_read(
    engine: VlmEngine, tiny_gemma_dir: Path, tmp_path: Path
) -> None:
    assert engine.card.score_format.decimals == 1
    assert len(engine.loaded.tokens.decimal_ids) == 10
    model = tmp_path / "model"
    shutil.copytree(tiny_gemma_dir, model)
    card = replace(tiny_card(), answer_template="Score: {score:.0f}\nReasoning: {reasoning}")
    card.save(model)
    integer = VlmEngine(model, device="cpu")
    assert integer.card.score_format.decimals == 0
    assert integer.loaded.tokens.decimal_ids == ()
    series = _series(3)
    ints = integer.read_slices(series.slices)
    decs = engine.read_slices(series.slices)
    for a, b in zip(ints, decs, strict=True):
        assert a.values == (0.0, 1.0, 2.0, 3.0, 4.0)
        # the same weights and prompt: the integer card's distribution is p(d) itself
        np.testing.assert_allclose(a.probabilities, b.digit_probabilities, atol=1e-6)
        assert a.expected == pytest.approx(b.digit_expected, abs=1e-6)


def _batch_sizes(model: Any) -> tuple[list[tuple[int, ...]], Any]:
    shapes: list[tuple[int, ...]] = []

    def hook(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        shapes.append(tuple(kwargs["input_ids"].shape))

    return shapes, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def small_batch_engine(tiny_gemma_dir: Path) -> Iterator[VlmEngine]:
    yield VlmEngine(tiny_gemma_dir, device="cpu", max_batch=2)


def test_max_batch_chunks_the_readout_with_two_passes_per_chunk(
    engine: VlmEngine, small_batch_engine: VlmEngine
) -> None:
    series = _series(5)
    assert engine.max_batch == 8 and small_batch_engine.max_batch == 2
    shapes, handle = _batch_sizes(small_batch_engine.loaded.model)
    try:
        chunked = small_batch_engine.read_slices(series.slices)
    finally:
        handle.remove()
    prompt_len = shapes[0][1]
    # per chunk of K slices: the prompt pass (K rows), then 4·K two-token continuations
    assert shapes == [(2, prompt_len), (8, 2), (2, prompt_len), (8, 2), (1, prompt_len), (4, 2)]
    whole = engine.read_slices(series.slices)
    np.testing.assert_allclose(
        [r.probabilities for r in chunked], [r.probabilities for r in whole], atol=1e-6
    )
    texts = small_batch_engine.generate(series.slices[:3])  # generation is chunked too
    assert len(texts) == 3


def test_max_batch_must_be_positive(tiny_gemma_dir: Path) -> None:
    with pytest.raises(EngineError, match="max_batch"):
        VlmEngine(tiny_gemma_dir, device="cpu", max_batch=0)


def test_from_digits_is_the_formula() -> None:
    digits = (0.1, 0.2, 0.3, 0.25, 0.15)
    rng = np.random.default_rng(0)
    decimals = [tuple(rng.dirichlet(np.ones(10))) for _ in range(4)] + [(1.0,)]
    readout = SliceReadout.from_digits(digits, decimals)
    formula = sum(
        p * (d + sum(e * q for e, q in enumerate(decimals[d])) / 10) for d, p in enumerate(digits)
    )
    assert readout.expected == pytest.approx(formula, abs=1e-12)
    assert readout.digit_expected == pytest.approx(sum(d * p for d, p in enumerate(digits)))
    assert SliceReadout.from_digits(digits).expected == pytest.approx(readout.digit_expected)


def _overfit(model_dir: Path, out: Path, score: float, steps: int = 25) -> Path:
    """Fine-tune the tiny model's decoder (full precision) on one answer; save it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    card = ModelCard.load(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    image = to_image(_series(1).slices[0].rgb)
    text = prompt_text(processor, card) + card.answer(score, "noise")
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    for name, param in model.named_parameters():
        param.requires_grad_("vision" not in name)
    torch.manual_seed(0)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    card.save(out)
    return out


def test_a_model_trained_on_x_point_y_reads_x_point_y_not_x(
    tiny_gemma_dir: Path, tmp_path: Path
) -> None:
    """The bias the digit-only read-out had: a model that answers 2.6 read as ~2.0."""
    trained = _overfit(tiny_gemma_dir, tmp_path / "trained", 2.6)
    engine = VlmEngine(trained, device="cpu", quantize=False)
    (readout,) = engine.read_slices(_series(1).slices)
    print(f"decimal read-out {readout.expected:.3f}, digit only {readout.digit_expected:.3f}")
    assert readout.expected == pytest.approx(2.6, abs=0.05)
    assert readout.digit_expected == pytest.approx(2.0, abs=0.05)
