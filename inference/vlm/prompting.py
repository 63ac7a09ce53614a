"""Prompts and model inputs from the model card, shared by inference and training.

The user turn is the card's prompt text and one image, in the card's order, rendered
with the processor's own chat template (Gemma 3: ``<start_of_turn>user`` … the image
becomes ``<start_of_image>`` and is expanded by the processor to the image tokens).

Training renders prompt and answer together with the same chat template
(:func:`messages` with ``answer``), tokenized as one text; :func:`score_tokens` checks
that teacher-forcing the answer prefix after the prompt gives exactly those tokens, so
the score position means the same thing in training and in the read-out; for answers
written ``Score: X.X`` it also finds the separator and decimal-digit tokens exactly as a
training answer (:meth:`~inference.card.ModelCard.answer`) tokenizes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from inference.card import ModelCard
from inference.errors import EngineError


class PromptError(EngineError, ValueError):
    """The card and the tokenizer do not fit together (e.g. a score is not one token)."""


@dataclass(frozen=True)
class ScoreTokens:
    """Token ids for reading the score.

    Attributes
    ----------
    prefix_ids
        Teacher-forced after the prompt (``Score: ``); the next token is the score digit.
    digit_ids
        One id per score digit (score i ↔ ``digit_ids[i]``).
    separator_ids
        Between the digit and the decimal digit (``.``); empty when no decimal is read.
    decimal_ids
        The ten decimal digits 0–9 after the separator; empty when the card's answer
        format has no decimal.
    """

    prefix_ids: tuple[int, ...]
    digit_ids: tuple[int, ...]
    separator_ids: tuple[int, ...] = ()
    decimal_ids: tuple[int, ...] = ()

    @property
    def values(self) -> tuple[float, ...]:
        """The score each digit stands for (0, 1, 2, …)."""
        return tuple(float(i) for i in range(len(self.digit_ids)))

    @property
    def decimals(self) -> int:
        """1 when the decimal digit is read, else 0."""
        return 1 if self.decimal_ids else 0


def messages(card: ModelCard, answer: str | None = None) -> list[dict[str, Any]]:
    """Chat messages: one user turn (text and image in the card's order), optional answer."""
    text = {"type": "text", "text": card.prompt}
    image = {"type": "image"}
    content = [image, text] if card.image_first else [text, image]
    turns: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def prompt_text(processor: Any, card: ModelCard) -> str:
    """The prompt up to and including the start of the model's turn."""
    text = processor.apply_chat_template(
        messages(card), add_generation_prompt=True, tokenize=False
    )
    return str(text)


def score_tokens(tokenizer: Any, card: ModelCard, prompt: str) -> ScoreTokens:
    """Find the ids to append to the prompt and the single next token of each score.

    ``prompt + answer_prefix + s`` is tokenized as one text for every score string
    ``s`` — as a training example (prompt and answer rendered by the chat template) is.
    Their longest common prefix must start with the prompt's own tokens; the rest of it
    is what gets teacher-forced, and each score must add exactly one token, whatever
    the tokenizer does with the space before the digit.

    When the card writes one decimal (``Score: X.X``), the separator and decimal-digit
    tokens are found the same way, from training answers ``card.answer(d.e, …)``.

    Raises
    ------
    PromptError
        If the prompt's tokens change when the answer follows, or a score string (or a
        decimal digit) is not a single token.
    """
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = encode(prompt)
    encoded = [encode(prompt + card.answer_prefix + s) for s in card.score_tokens]
    common = _common_prefix(encoded)
    if common[: len(base)] != base or len(common) <= len(base):
        raise PromptError(
            f"the prompt's tokens change when the answer prefix {card.answer_prefix!r} "
            "follows it; choose an answer prefix that starts a new token"
        )
    tails = [ids[len(common):] for ids in encoded]
    bad = [s for s, tail in zip(card.score_tokens, tails, strict=True) if len(tail) != 1]
    if bad:
        raise PromptError(
            f"score strings {bad} are not single tokens after {card.answer_prefix!r}; "
            "the score read-out needs one token per score"
        )
    digits = tuple(tail[0] for tail in tails)
    separator: tuple[int, ...] = ()
    decimal: tuple[int, ...] = ()
    if card.score_format.decimals:
        separator, decimal = _decimal_tokens(encode, prompt, card, common, digits)
    return ScoreTokens(tuple(common[len(base):]), digits, separator, decimal)


def _decimal_tokens(
    encode: Callable[[str], list[int]], prompt: str, card: ModelCard,
    head: Sequence[int], digits: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Separator ids and the ten decimal-digit ids, as training answers tokenize them.

    Every digit below the top score is followed by ``.0``–``.9`` (the top score only by
    ``.0``, which is not read). Each answer must start with ``head`` + its digit id; the
    tokens common to all of them after that are the separator; then each decimal digit
    must be one token, the same whichever digit precedes it.
    """
    tails: dict[tuple[int, int], list[int]] = {}
    for d in range(len(digits) - 1):
        for e in range(10):
            ids = encode(prompt + card.answer(round(d + e / 10, 1), "x"))
            if ids[: len(head)] != list(head) or ids[len(head): len(head) + 1] != [digits[d]]:
                raise PromptError(
                    f"the score digit {card.score_tokens[d]!r} of answer "
                    f"{card.answer(round(d + e / 10, 1), '')!r} is not the token read after "
                    f"{card.answer_prefix!r}; the decimal read-out needs them to agree"
                )
            tails[(d, e)] = ids[len(head) + 1:]
    separator = _common_prefix(list(tails.values()))
    decimal_of: dict[int, set[int]] = {e: set() for e in range(10)}
    for (_, e), tail in tails.items():
        decimal_of[e].add(tail[len(separator)])
    ids = [next(iter(found)) for found in decimal_of.values() if len(found) == 1]
    if len(ids) != 10 or len(set(ids)) != 10:
        raise PromptError(
            f"the decimal digits after {card.score_format.separator!r} are not ten distinct "
            "single tokens; the decimal read-out needs one token per decimal digit"
        )
    return tuple(separator), tuple(ids)


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for column in zip(*seqs, strict=False):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    if any(len(s) == len(out) for s in seqs):
        out = out[:-1]  # every sequence must keep one token after the prefix
    return out


def to_image(rgb: NDArray[np.uint8]) -> Image.Image:
    """A PIL RGB image from an H×W×3 uint8 array (a windowed CT slice)."""
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got {array.dtype} {array.shape}")
    return Image.fromarray(array, mode="RGB")


def encode_batch(
    processor: Any,
    card: ModelCard,
    images: Sequence[Image.Image],
    *,
    suffix_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt per image, left-padded, with ``suffix_ids`` appended.

    The suffix (e.g. the answer prefix ``Score: ``) is appended after the chat template's
    model-turn start to every row, so the last position of every row is the same place
    in the answer. Pixel values are cast to ``dtype`` (the compute dtype).
    """
    if not images:
        raise ValueError("no images to encode")
    text = prompt_text(processor, card)
    batch = processor(
        text=[text] * len(images), images=[[im] for im in images],
        return_tensors="pt", padding=True,
    )
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if suffix_ids:
        rows = len(images)
        suffix = torch.tensor(list(suffix_ids), dtype=inputs["input_ids"].dtype).repeat(rows, 1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], suffix], dim=1)
        inputs["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones_like(suffix)], dim=1
        )
        if "token_type_ids" in inputs:
            inputs["token_type_ids"] = torch.cat(
                [inputs["token_type_ids"], torch.zeros_like(suffix)], dim=1
            )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return {k: v.to(device) for k, v in inputs.items()}
