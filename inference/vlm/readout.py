"""Score read-out (Q-Align style) and explanation generation.

Read-out: the answer prefix (``Score: ``) is teacher-forced after the prompt, and the
model's next-token distribution, restricted to the score digits 0–4 and renormalised,
gives each slice's expected score and its spread — one batched forward pass over all
selected slices, keeping only the last position's logits.

Known bias: with answers written ``Score: X.X`` the first digit is the integer part, so
the expectation estimates the mean of floor(score): a model trained on such answers reads
low by the mean fractional part of its training scores (about 0.4 for LDCTIQA's 0.2
steps). Evaluation (mean error in ``qcnode evaluate``) shows and can calibrate it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from inference.card import ModelCard
from inference.vlm.prompting import ScoreTokens, encode_batch


@dataclass(frozen=True)
class SliceReadout:
    """Probabilities of the score digits at the score position of one slice."""

    probabilities: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def expected(self) -> float:
        """Expected score Σ p·v."""
        return sum(p * v for p, v in zip(self.probabilities, self.values, strict=True))

    @property
    def std(self) -> float:
        """Standard deviation of the score under the digit distribution."""
        mean = self.expected
        var = sum(
            p * (v - mean) ** 2 for p, v in zip(self.probabilities, self.values, strict=True)
        )
        return math.sqrt(max(var, 0.0))

    @property
    def mode(self) -> float:
        """The most probable score (what greedy decoding would write first)."""
        best = max(range(len(self.probabilities)), key=self.probabilities.__getitem__)
        return self.values[best]


def digit_distribution(last_logits: torch.Tensor, tokens: ScoreTokens) -> torch.Tensor:
    """Softmax over the score digits' logits (rows: slices), in float64."""
    ids = torch.tensor(tokens.digit_ids, device=last_logits.device)
    return torch.softmax(last_logits.index_select(-1, ids).double(), dim=-1)


def read_scores(
    model: Any,
    processor: Any,
    card: ModelCard,
    tokens: ScoreTokens,
    images: Sequence[Image.Image],
    *,
    dtype: torch.dtype,
    device: str,
) -> list[SliceReadout]:
    """One batched forward pass: the score digit distribution of every image."""
    inputs = encode_batch(
        processor, card, images, suffix_ids=tokens.prefix_ids, dtype=dtype, device=device
    )
    with torch.inference_mode():
        out = model(**inputs, logits_to_keep=1, use_cache=False)
    probs = digit_distribution(out.logits[:, -1, :], tokens).cpu().tolist()
    return [SliceReadout(tuple(row), tokens.values) for row in probs]


def generate_answers(
    model: Any,
    processor: Any,
    card: ModelCard,
    images: Sequence[Image.Image],
    *,
    dtype: torch.dtype,
    device: str,
) -> list[str]:
    """The model's full answers (score and reasoning) for ``images``, batched.

    Settings from the card: ``max_new_tokens``; greedy decoding unless ``greedy`` is false.
    """
    inputs = encode_batch(processor, card, images, dtype=dtype, device=device)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=card.max_new_tokens, do_sample=not card.greedy,
        )
    texts = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return [str(t).strip() for t in texts]
