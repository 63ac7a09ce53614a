"""The VLM engine on a tiny random Gemma 3 (CPU, real code path, 4-bit NF4 via bitsandbytes).

Nothing is faked: the engine loads the model from a local directory the way it loads
MedGemma, and its numbers are checked against plain transformers calls.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from inference.card import ModelCard
from inference.engine import Engine, create_engine, engine_window
from inference.prepare import PreparedSeries
from inference.result import SCORE_LABELS
from inference.vlm import ModelDirectoryError, VlmEngine
from inference.vlm.engine import aggregate, deciding_slices
from inference.vlm.policy import ExplainMode, ExplainPolicy
from inference.vlm.prompting import prompt_text, to_image
from inference.vlm.readout import SliceReadout
from tests.support.labelled import phantom
from tests.support.prepared import random_series
from tests.support.tiny_gemma import build_merged

N_SLICES = 6


def _series(n: int = N_SLICES, seed: int = 0) -> PreparedSeries:
    return random_series(n, seed=seed, series=1)


@pytest.fixture(scope="module")
def engine(tiny_gemma_dir: Path) -> VlmEngine:
    return VlmEngine(tiny_gemma_dir, device="cpu")


@pytest.fixture(scope="module")
def adapter_engine(tiny_gemma_dir: Path, tiny_adapter_dir: Path) -> VlmEngine:
    return VlmEngine(tiny_gemma_dir, tiny_adapter_dir, device="cpu")


def _plain_model(model_dir: Path):
    return AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    ).eval()


def test_loads_4bit_nf4_double_quant_fp32_compute_on_cpu(engine: VlmEngine) -> None:
    from bitsandbytes.nn import Linear4bit  # type: ignore[attr-defined]

    layers: list[Any] = [m for m in engine.loaded.model.modules() if isinstance(m, Linear4bit)]
    assert layers, "no 4-bit layers"
    for layer in layers:
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.compress_statistics  # double quantisation
        assert layer.compute_dtype == torch.float32
    assert engine.loaded.device == "cpu"
    assert isinstance(engine, Engine)


def test_batched_readout_equals_hand_softmax_of_plain_forward(
    engine: VlmEngine, tiny_gemma_dir: Path
) -> None:
    """The first digit's distribution p(d) (the decimal read-out builds on it)."""
    series = _series()
    readouts = engine.read_slices(series.slices)
    # The same thing by hand, one slice at a time, through the engine's own 4-bit model
    # (the quantised weights are what the read-out uses).
    lm = engine.loaded
    processor = AutoProcessor.from_pretrained(tiny_gemma_dir, local_files_only=True)
    text = prompt_text(processor, engine.card) + engine.card.answer_prefix
    digit_ids = processor.tokenizer.convert_tokens_to_ids(list("01234"))
    for sl, readout in zip(series.slices, readouts, strict=True):
        inputs = processor(text=[text], images=[[to_image(sl.rgb)]], return_tensors="pt")
        with torch.no_grad():
            logits = lm.model(**inputs).logits[0, -1].double().numpy()
        digits = logits[digit_ids]
        p = np.exp(digits - digits.max())
        p /= p.sum()
        expected = float((p * np.arange(5)).sum())
        std = float(np.sqrt((p * (np.arange(5) - expected) ** 2).sum()))
        np.testing.assert_allclose(readout.digit_probabilities, p, atol=1e-5)
        assert readout.digit_expected == pytest.approx(expected, abs=1e-5)
        digit_only = SliceReadout.from_digits(readout.digit_probabilities)
        assert digit_only.std == pytest.approx(std, abs=1e-5)
    spread = max(r.expected for r in readouts) - min(r.expected for r in readouts)
    assert spread > 1e-3, "images must change the read-out"


def test_generation_matches_plain_greedy_generate(engine: VlmEngine) -> None:
    series = _series(2)
    texts = engine.generate(series.slices[:1])
    lm = engine.loaded
    text = prompt_text(lm.processor, engine.card)
    inputs = lm.processor(
        text=[text], images=[[to_image(series.slices[0].rgb)]], return_tensors="pt"
    )
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=engine.card.max_new_tokens,
                                do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 0 < len(new) <= engine.card.max_new_tokens
    assert texts == [lm.processor.decode(new, skip_special_tokens=True).strip()]


def test_assess_scores_every_slice_and_explains_the_deciding_ones(engine: VlmEngine) -> None:
    series = _series()
    result = engine.assess(series)
    readouts = engine.read_slices(series.slices)
    assert [s.sop_instance_uid for s in result.slices] == [
        s.sop_instance_uid for s in series.slices
    ]
    for s, r in zip(result.slices, readouts, strict=True):
        assert s.score == pytest.approx(r.expected, abs=1e-6)
        assert s.uncertainty == pytest.approx(r.std, abs=1e-6)
    mean, spread = aggregate(readouts)
    assert result.score == pytest.approx(mean, abs=1e-6)
    assert result.uncertainty == pytest.approx(spread, abs=1e-6)
    assert result.label in SCORE_LABELS
    # The random model writes no "Score:" line: both explained slices say so in the notes.
    assert sum("no score after a 'Score:' label" in n for n in result.notes) == 2
    assert result.explanation
    assert result.engine == engine.info
    assert result.engine.name == "vlm"
    assert result.engine.model_revision is not None
    assert result.engine.model_revision.startswith("sha256:")


def test_deciding_slices_and_aggregate() -> None:
    assert deciding_slices([2.0, 1.0, 3.0, 2.5, 0.5], ("worst", "median")) == [
        (4, "worst"), (0, "median"),
    ]
    assert deciding_slices([2.0], ("worst", "median", "best")) == [(0, "worst")]
    a = SliceReadout.from_digits((0.0, 0.0, 1.0, 0.0, 0.0))
    b = SliceReadout.from_digits((0.0, 0.0, 0.0, 0.0, 1.0))
    assert aggregate([a, b]) == (3.0, 1.0)


def test_adapter_loads_and_changes_the_output(
    engine: VlmEngine, adapter_engine: VlmEngine, tiny_adapter_dir: Path
) -> None:
    from peft import PeftModel

    assert isinstance(adapter_engine.loaded.model, PeftModel)
    series = _series(3)
    base = [r.probabilities for r in engine.read_slices(series.slices)]
    tuned = [r.probabilities for r in adapter_engine.read_slices(series.slices)]
    assert not np.allclose(base, tuned, atol=1e-4)
    result = adapter_engine.assess(series)  # generation through the PEFT wrapper too
    assert len(result.slices) == len(series.slices)
    info = adapter_engine.info
    assert result.engine == info
    assert info.adapter_revision is not None and info.adapter_revision.startswith("sha256:")
    assert info.key != engine.info.key


def test_merged_matches_unmerged_within_rounding(
    engine: VlmEngine, adapter_engine: VlmEngine, tiny_gemma_dir: Path, tiny_adapter_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    merged_dir = build_merged(
        tiny_gemma_dir, tiny_adapter_dir, tmp_path_factory.mktemp("merged")
    )
    series = _series()
    # Unquantised, merging is exact up to float rounding.
    full_unmerged = VlmEngine(tiny_gemma_dir, tiny_adapter_dir, device="cpu", quantize=False)
    full_merged = VlmEngine(merged_dir, device="cpu", quantize=False)
    full = full_unmerged.read_slices(series.slices)
    np.testing.assert_allclose(
        [r.probabilities for r in full],
        [r.probabilities for r in full_merged.read_slices(series.slices)], atol=1e-5,
    )
    # 4-bit: the merged weights are re-quantised (NF4 rounds the LoRA delta into the
    # base), while unmerged the delta stays fp32 beside the 4-bit base. The two differ
    # by quantisation rounding: stated tolerance 0.1 on the 0–4 scale (measured here:
    # ~0.02–0.05). The exact check of the merge itself is the full-precision one above.
    merged = VlmEngine(merged_dir, device="cpu")
    a = np.array([r.expected for r in adapter_engine.read_slices(series.slices)])
    b = np.array([r.expected for r in merged.read_slices(series.slices)])
    base = np.array([r.expected for r in engine.read_slices(series.slices)])
    print(f"merged vs unmerged (4-bit): {np.abs(a - b).max():.4f}; "
          f"adapter effect: {np.abs(a - base).mean():.4f}")
    assert np.abs(a - b).max() <= 0.1
    assert merged.info.adapter_revision == "tiny-adapter-merged"
    assert merged.info.model_revision is not None
    assert merged.info.model_revision.startswith("sha256:")


def test_missing_directory_and_hub_id_fail_fast(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    with pytest.raises(ModelDirectoryError, match=r"--model DIR") as hub:
        VlmEngine("google/medgemma-4b-it")
    assert "hub id" in str(hub.value)
    with pytest.raises(ModelDirectoryError, match=r"does not exist.*--model DIR"):
        VlmEngine(tmp_path / "nowhere")
    with pytest.raises(ModelDirectoryError, match=r"no config\.json"):
        VlmEngine(tmp_path)
    with pytest.raises(ModelDirectoryError, match="--adapter DIR"):
        VlmEngine(tiny_gemma_dir, tmp_path / "no-adapter")


def test_adapter_given_as_model_is_explained(tiny_adapter_dir: Path) -> None:
    (tiny_adapter_dir / "config.json").write_text("{}")
    try:
        with pytest.raises(ModelDirectoryError, match="holds a LoRA adapter"):
            VlmEngine(tiny_adapter_dir)
    finally:
        (tiny_adapter_dir / "config.json").unlink()


def test_card_image_size_must_match_the_vision_tower(
    tiny_gemma_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_gemma_dir, model)
    ModelCard(image_size=896).save(model)  # MedGemma's size, not the tiny tower's 64 px
    engine = VlmEngine(model, device="cpu")
    with pytest.raises(ModelDirectoryError, match="image_size 896"):
        _ = engine.loaded


def test_create_engine_builds_the_vlm(tiny_gemma_dir: Path, tiny_adapter_dir: Path) -> None:
    engine = create_engine("vlm", model=tiny_gemma_dir, device="cpu")
    assert isinstance(engine, VlmEngine)
    assert engine.info.name == "vlm"
    # The window the prepare step uses comes from the same card the engine reads.
    window = engine_window("vlm", model=tiny_gemma_dir, adapter=tiny_adapter_dir)
    assert window == engine.card.window


def test_disagreement_between_text_and_readout_is_noted(engine: VlmEngine) -> None:
    from inference.vlm.engine import _disagreement

    readout = SliceReadout.from_digits((0.0, 0.0, 0.1, 0.8, 0.1))
    assert _disagreement("worst slice (slice 7)", readout, 3.2, None, engine.card) == []
    (note,) = _disagreement("worst slice (slice 7)", readout, 1.0, None, engine.card)
    assert note.startswith("worst slice (slice 7): ")
    assert "says score 1" in note and "gives 3.0 " in note
    (missing,) = _disagreement("median", readout, None, "no score", engine.card)
    assert "no score" in missing


def test_vlm_engine_is_an_engine_for_the_type_checker(tiny_gemma_dir: Path) -> None:
    engine: Engine = VlmEngine(tiny_gemma_dir, device="cpu")
    assert engine.info.version


def _phantom_series(n: int = 3) -> PreparedSeries:
    """Random RGB for the model, a measurable water-cylinder phantom in HU for physics."""
    base = random_series(n, seed=4, series=1)
    slices = tuple(replace(s, hu=phantom(72, seed=i).astype(np.float32))
                   for i, s in enumerate(base.slices))
    return replace(base, slices=slices)


def test_the_vlm_result_carries_the_physics_evidence_of_its_slices(engine: VlmEngine) -> None:
    """The README's promise: the measured evidence (noise in HU, where) beside the words.
    Before, only the physics engine's result had any."""
    series = _phantom_series()
    result = engine.assess(series)
    noise = [m for m in result.evidence if m.name == "noise_hu"]
    assert len(noise) == 1
    assert 5.0 < noise[0].value < 20.0  # the phantom's noise is 10 HU
    assert noise[0].sop_instance_uid in {s.sop_instance_uid for s in series.slices}
    assert noise[0].region is not None  # where it was measured


@pytest.mark.parametrize(("mode", "below", "explained"),
                         [("never", 2.5, False), ("below", 0.0, False), ("below", 4.0, True)])
def test_the_explain_policy_decides_which_series_get_generated_text(
    tiny_gemma_dir: Path, mode: ExplainMode, below: float, explained: bool
) -> None:
    engine = VlmEngine(tiny_gemma_dir, device="cpu", explain=ExplainPolicy(mode, below))
    result = engine.assess(_phantom_series())
    # the tiny random model writes no "Score:" line: each generated answer leaves a note
    generated = any("no score after a 'Score:' label" in n for n in result.notes)
    assert generated is explained
    if not explained:  # the physics measurements in words, and the read-out score
        assert result.explanation.startswith("Noise ")
        assert "read from the model's score probabilities" in result.explanation


def test_ratings_in_the_generated_prose_never_contradict_the_readout(engine: VlmEngine) -> None:
    """The published answers repeat their score inside the prose; before, only the
    ``Score:`` line was taken out, and a report could say "rate it 1/4" beside 3.0."""
    from inference.vlm.engine import _Explained

    series = _phantom_series(1)
    readouts = [SliceReadout.from_digits((0.0, 0.0, 0.1, 0.8, 0.1))]  # read-out 3.0
    answer = ("Score: 3.0\nReasoning: Mild noise in the liver. Overall I would rate it 1/4. "
              "The image quality is bad.")
    result = engine._result(series, readouts, [_Explained(0, "worst", answer)])
    assert "1/4" not in result.explanation and "bad" not in result.explanation
    assert "Mild noise in the liver." in result.explanation
    notes = [n for n in result.notes if "left out" in n]
    assert len(notes) == 2 and "read-out gives 3.0" in notes[0]


def test_explanation_names_slices_by_instance_number_with_one_decimal(
        engine: VlmEngine) -> None:
    """The radiologist finds "slice 57" in the viewer; a z position or 2.13 they do not."""
    import dataclasses

    from inference.vlm.engine import _Explained

    series = _series(3)
    numbered = tuple(dataclasses.replace(s, instance_number=55 + i)
                     for i, s in enumerate(series.slices))
    series = dataclasses.replace(series, slices=numbered)
    readouts = [SliceReadout.from_digits(p) for p in ((0, 0.13, 0.61, 0.26, 0),
                                                       (0, 0, 0.2, 0.6, 0.2),
                                                       (0, 0, 0, 0.3, 0.7))]
    explained = [_Explained(0, "worst", "Score: 2.1\nReasoning: streaks over the liver.")]
    result = engine._result(series, readouts, explained)
    expected = f"Worst slice (slice 55, score {readouts[0].expected:.1f}): streaks over the liver."
    assert result.explanation == expected
    assert "z " not in result.explanation


def test_several_series_assessed_together_equal_each_alone(tiny_gemma_dir: Path) -> None:
    """Batching across series: the read-out passes are filled with slices of several
    series (3 + 2 + 4 slices in batches of 4: 3 passes instead of 4) and the explanations
    of all of them generated together; every result is what that series alone gives."""
    engine = VlmEngine(tiny_gemma_dir, device="cpu", max_batch=4)
    batch = [random_series(n, seed=10 + n, series=20 + n) for n in (3, 2, 4)]
    shapes: list[tuple[int, ...]] = []
    handle = engine.loaded.model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        together = engine.assess_many(batch)
    finally:
        handle.remove()
    prompt_passes = [s for s in shapes if s[1] > 2]
    assert [s[0] for s in prompt_passes[:3]] == [4, 4, 1]  # read-out, filled across series
    alone = [engine.assess(series) for series in batch]
    for a, b in zip(together, alone, strict=True):
        assert a.series_instance_uid == b.series_instance_uid
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert [s.score for s in a.slices] == pytest.approx([s.score for s in b.slices],
                                                             abs=1e-5)
        assert a.explanation == b.explanation
