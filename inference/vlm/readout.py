"""Score read-out (Q-Align style) and explanation generation.

Read-out: the answer prefix (``Score: ``) is teacher-forced after the prompt, and the
model's next-token distribution, restricted to the score digits and renormalised, gives
p(d). When the card's answers are written ``Score: X.X`` the decimal digit is read too:
each digit d below the top score is teacher-forced with its separator (``d.``) and the
next-token distribution over 0–9 gives p(e | d). The slice's score distribution is then
the exact one over the answer format's values d.e (41 bins on 0–4: the top score is only
written ``4.0``), and

    E[score] = Σ_d p(d) · (d + E[e | d] / 10),

with the spread from the same distribution. Reading only the first digit would estimate
the mean of floor(score), about 0.4 too low for LDCTIQA's 0.2-step labels.

Cost per batch of K slices: one forward pass over the prompts (image and text tokens,
``Score: `` appended), keeping its KV cache, then one batched pass of 4·K two-token
continuations (``d.`` for d = 0–3) on the repeated cache. Batches hold at most
``max_batch`` slices (the card's setting).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from inference.card import ModelCard
from inference.errors import EngineError
from inference.vlm.prompting import ScoreTokens, encode_batch

#: A decimal digit e after digit d means d + e / DECIMAL_BASE.
DECIMAL_BASE = 10


@dataclass(frozen=True)
class SliceReadout:
    """The score distribution of one slice, read from the model's token probabilities.

    Attributes
    ----------
    probabilities, values
        The distribution over the scores the answer format can write (``0.0`` … ``4.0``
        in 0.1 steps for ``Score: X.X``; ``0`` … ``4`` for an integer-only card).
    digit_probabilities
        p(d): the first digit's distribution at the score position (score i ↔ i-th).
    """

    probabilities: tuple[float, ...]
    values: tuple[float, ...]
    digit_probabilities: tuple[float, ...]

    @classmethod
    def from_digits(
        cls, digits: Sequence[float], decimals: Sequence[Sequence[float]] | None = None
    ) -> SliceReadout:
        """Build the distribution from p(d) and, per digit, p(e | d) over e = 0, 1, ….

        ``decimals[i]`` may be shorter than ten (the top score has only ``.0``); without
        ``decimals`` the values are the digits themselves.
        """
        probs: list[float] = []
        values: list[float] = []
        for d, p_digit in enumerate(digits):
            conditional = (1.0,) if decimals is None else decimals[d]
            for e, p_decimal in enumerate(conditional):
                probs.append(float(p_digit) * float(p_decimal))
                values.append(d + e / DECIMAL_BASE)
        return cls(tuple(probs), tuple(values), tuple(float(p) for p in digits))

    @property
    def expected(self) -> float:
        """Expected score Σ p·v."""
        return math.fsum(p * v for p, v in zip(self.probabilities, self.values, strict=True))

    @property
    def std(self) -> float:
        """Standard deviation of the score under the distribution."""
        mean = self.expected
        var = math.fsum(
            p * (v - mean) ** 2 for p, v in zip(self.probabilities, self.values, strict=True)
        )
        return math.sqrt(max(var, 0.0))

    @property
    def mode(self) -> float:
        """The most probable score value."""
        best = max(range(len(self.probabilities)), key=self.probabilities.__getitem__)
        return self.values[best]

    @property
    def digit_expected(self) -> float:
        """Σ_d p(d)·d: the first digit's expectation alone (what a digit-only read gives)."""
        return math.fsum(p * d for d, p in enumerate(self.digit_probabilities))


def digit_distribution(last_logits: torch.Tensor, tokens: ScoreTokens) -> torch.Tensor:
    """Softmax over the score digits' logits (rows: slices), in float64."""
    return _restricted_softmax(last_logits, tokens.digit_ids)


def renormalised(logprobs: Sequence[float]) -> list[float]:
    """The distribution over a few tokens from their log-probabilities (or logits).

    The same restricted softmax as the logits read-out: log-probabilities differ from
    the logits by the log of the full vocabulary's normaliser, which cancels.
    """
    values = torch.tensor([list(logprobs)], dtype=torch.float64)
    return [float(p) for p in _restricted_softmax(values, range(len(logprobs)))[0]]


def _restricted_softmax(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    index = torch.tensor(list(ids), device=logits.device)
    return torch.softmax(logits.index_select(-1, index).double(), dim=-1)


def read_scores(
    model: Any,
    processor: Any,
    card: ModelCard,
    tokens: ScoreTokens,
    images: Sequence[Image.Image],
    *,
    dtype: torch.dtype,
    device: str,
    max_batch: int | None = None,
) -> list[SliceReadout]:
    """The score distribution of every image, in batches of at most ``max_batch``.

    ``max_batch`` defaults to the card's. Per batch: one forward pass over the prompts,
    plus, when the card's answers carry a decimal, one batched pass of the ``d.``
    continuations on the prompt pass's KV cache.
    """
    size = max_batch if max_batch is not None else card.max_batch
    if size < 1:
        raise ValueError(f"max_batch must be at least 1, got {size}")
    out: list[SliceReadout] = []
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        out.extend(_read_batch(model, processor, card, tokens, chunk, dtype, device))
    return out


def _read_batch(
    model: Any, processor: Any, card: ModelCard, tokens: ScoreTokens,
    images: Sequence[Image.Image], dtype: torch.dtype, device: str,
) -> list[SliceReadout]:
    inputs = encode_batch(
        processor, card, images, suffix_ids=tokens.prefix_ids, dtype=dtype, device=device
    )
    with torch.inference_mode():
        out = model(**inputs, logits_to_keep=1, use_cache=bool(tokens.decimal_ids))
        digits = digit_distribution(out.logits[:, -1, :], tokens).cpu()
        if not tokens.decimal_ids:
            return [SliceReadout.from_digits(row.tolist()) for row in digits]
        decimals = _decimal_distribution(
            model, _returned_cache(out), inputs["attention_mask"], tokens
        ).cpu()
    readouts = []
    for row, conditional in zip(digits, decimals, strict=True):
        per_digit = [c.tolist() for c in conditional] + [[1.0]]  # the top score: only .0
        readouts.append(SliceReadout.from_digits(row.tolist(), per_digit))
    return readouts


def _decimal_distribution(
    model: Any, cache: Any, attention_mask: torch.Tensor, tokens: ScoreTokens
) -> torch.Tensor:
    """p(e | d) for every slice and every digit d below the top: shape (K, D, 10).

    The prompt pass's cache is repeated D times along the batch (row k·D + j continues
    slice k with digit j) and extended by ``d`` + separator in one forward pass.
    """
    rows = attention_mask.shape[0]
    heads = tokens.digit_ids[:-1]  # the top score is written only as X.0
    if not hasattr(cache, "batch_repeat_interleave"):
        raise EngineError(
            f"the model returned no usable KV cache ({type(cache).__name__}); the decimal "
            "score read-out continues the prompt pass's cache"
        )
    cache.batch_repeat_interleave(len(heads))
    ext = torch.tensor(
        [[d, *tokens.separator_ids] for d in heads], dtype=torch.long,
        device=attention_mask.device,
    ).repeat(rows, 1)
    mask = torch.cat(
        [attention_mask.repeat_interleave(len(heads), dim=0), torch.ones_like(ext)], dim=1
    )
    out = model(
        input_ids=ext, attention_mask=mask, logits_to_keep=1, use_cache=True,
        **{cache_keyword(model): cache},
    )
    probs = _restricted_softmax(out.logits[:, -1, :], tokens.decimal_ids)
    return probs.reshape(rows, len(heads), len(tokens.decimal_ids))


def cache_keyword(model: Any) -> str:
    """The keyword the model's ``forward`` takes a KV cache by.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns, and
    goes in 5.40); the range in pyproject admits releases on both sides, so the
    unwrapped model's own signature decides. A PEFT wrapper forwards ``**kwargs``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The KV cache a forward pass returned, under either name (see :func:`cache_keyword`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def generate_answers(
    model: Any,
    processor: Any,
    card: ModelCard,
    images: Sequence[Image.Image],
    *,
    dtype: torch.dtype,
    device: str,
    max_batch: int | None = None,
) -> list[str]:
    """The model's full answers (score and reasoning) for ``images``, batched.

    Settings from the card: ``max_new_tokens``; greedy decoding unless ``greedy`` is
    false; at most ``max_batch`` (default: the card's) images per ``generate`` call.
    """
    size = max_batch if max_batch is not None else card.max_batch
    if size < 1:
        raise ValueError(f"max_batch must be at least 1, got {size}")
    texts: list[str] = []
    for start in range(0, len(images), size):
        inputs = encode_batch(
            processor, card, images[start:start + size], dtype=dtype, device=device
        )
        prompt_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=card.max_new_tokens, do_sample=not card.greedy,
            )
        decoded = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        texts.extend(str(t).strip() for t in decoded)
    return texts
