"""Training examples for the VLM: prompt + image + answer, labels on the answer only.

Each example is the card's conversation — the user turn (prompt text and image in the
card's order) and the model's answer in the card's format — rendered by the processor's
chat template as one text (:func:`inference.vlm.prompting.messages`); its first tokens
are exactly the prompt inference feeds the model
(:func:`~inference.vlm.prompting.prompt_text`), which is checked. The example is cut
after the answer's ``<end_of_turn>``. Labels are ``-100`` (ignored by the loss) on every
prompt token — the text, ``<start_of_image>``, the image soft tokens, ``<end_of_image>``
and the turn markers — and on padding; the answer and its end-of-turn carry the loss.
Gemma 3 needs ``token_type_ids`` (1 on image tokens) in the batch to attend
bidirectionally within the image; they are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from inference.card import ModelCard
from inference.dataset import Record, load_pil
from inference.vlm.prompting import messages, prompt_text

IGNORE_INDEX = -100
END_OF_TURN = "<end_of_turn>"


class TrainDataError(ValueError):
    """The records cannot be turned into training examples (message says which)."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example (1-D tensors, no padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor  # 3×H×W
    record_id: str


def answer_for(record: Record, card: ModelCard, *, require_explanation: bool) -> str:
    """The target answer of ``record`` in the card's format (``Score: X.X`` …)."""
    if record.explanation is None and require_explanation:
        raise TrainDataError(
            f"record {record.id} (line {record.line}) has no explanation; draft them with "
            "`qcnode train explain` or set data.require_explanations = false"
        )
    return card.answer(record.score, record.explanation or "")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The id of Gemma's ``<end_of_turn>`` (the answer's terminator), else EOS."""
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return [tid]
    return [int(tokenizer.eos_token_id)]


def _encode(processor: Any, text: str, image: Any) -> dict[str, torch.Tensor]:
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def build_example(
    processor: Any, card: ModelCard, record: Record, *, require_explanation: bool = True,
) -> Example:
    """Tokenize one record; labels mask the whole prompt (see the module docstring).

    The conversation (prompt turn + answer turn) is rendered by the processor's chat
    template as one text, as :func:`inference.vlm.prompting.score_tokens` assumes; its
    first tokens must be exactly the inference prompt's (checked), the rest up to and
    including ``<end_of_turn>`` carries the loss.
    """
    answer = answer_for(record, card, require_explanation=require_explanation)
    image = load_pil(record, card.window)
    prompt = prompt_text(processor, card)
    full = str(processor.apply_chat_template(messages(card, answer), tokenize=False))
    if not full.startswith(prompt):
        raise TrainDataError("the chat template renders the prompt differently with an answer")
    prompt_ids = _encode(processor, prompt, image)["input_ids"][0]
    inputs = _encode(processor, full, image)
    input_ids = inputs["input_ids"][0]
    n_prompt = int(prompt_ids.numel())
    if not torch.equal(input_ids[:n_prompt], prompt_ids):
        raise TrainDataError(
            f"record {record.id}: the prompt's tokens change when the answer follows; "
            "the card's answer must start a new token"
        )
    stop = set(end_of_turn_ids(processor.tokenizer))
    ends = [i for i in range(n_prompt, int(input_ids.numel())) if int(input_ids[i]) in stop]
    end = ends[0] + 1 if ends else int(input_ids.numel())
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[n_prompt:end] = input_ids[n_prompt:end]
    token_type_ids = inputs.get("token_type_ids")
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(inputs["input_ids"])
    return Example(
        input_ids=input_ids[:end], attention_mask=inputs["attention_mask"][0][:end],
        token_type_ids=token_type_ids[0][:end], labels=labels[:end],
        pixel_values=inputs["pixel_values"][0], record_id=record.id,
    )


def check_explanations(records: Sequence[Record]) -> None:
    """Raise :class:`TrainDataError` listing every record without an explanation."""
    missing = [f"{r.id} (line {r.line})" for r in records if r.explanation is None]
    if missing:
        shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
        raise TrainDataError(
            f"{len(missing)} record(s) have no explanation: {shown}; draft them with "
            "`qcnode train explain` or set data.require_explanations = false"
        )


class ExampleDataset(torch.utils.data.Dataset[Example]):
    """Examples built on access (a 896 px image is ~10 MB as fp32: never hold them all)."""

    def __init__(
        self, processor: Any, card: ModelCard, records: Sequence[Record], *,
        require_explanations: bool = True,
    ) -> None:
        if not records:
            raise TrainDataError("no training records (check data.manifest and train_split)")
        if require_explanations:
            check_explanations(records)
        self.processor = processor
        self.card = card
        self.records = list(records)
        self.require_explanations = require_explanations

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        return build_example(
            self.processor, self.card, self.records[index],
            require_explanation=self.require_explanations,
        )


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    length = max(int(e.input_ids.numel()) for e in examples)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - int(t.numel())), value=value)

    return {
        "input_ids": torch.stack([pad(e.input_ids, pad_token_id) for e in examples]),
        "attention_mask": torch.stack([pad(e.attention_mask, 0) for e in examples]),
        "token_type_ids": torch.stack([pad(e.token_type_ids, 0) for e in examples]),
        "labels": torch.stack([pad(e.labels, IGNORE_INDEX) for e in examples]),
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
    }
