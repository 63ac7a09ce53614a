"""The vLLM backend: the same score read-out and answers as the transformers path.

vLLM brings what a GPU worker needs beyond a forward pass — paged KV cache, continuous
batching of many series' requests, prefix caching of the shared prompt, LoRA adapters
on Gemma 3 — so the engine uses it rather than batching by hand. Two ways to run it:

* in process (``[engine] backend = "vllm"``, no ``vllm_url``): a ``vllm.LLM`` in the GPU
  worker (:mod:`inference.vlm.vllm_local`);
* a separate ``vllm serve`` (OpenAI-compatible) addressed by ``vllm_url``
  (:mod:`inference.vlm.vllm_server`), so several workers and hosts share the GPUs.

Read-out through log-probabilities, as :mod:`inference.vlm.readout` does with logits:
the assistant turn is continued from the card's answer prefix (``Score: ``) and the
log-probabilities of the score digits at the next position are read (vLLM's
``logprob_token_ids``: exactly those tokens, raw, whatever their rank); for
``Score: X.X`` answers, each digit below the top is continued with its separator
(``Score: 3.``) and the ten decimal digits are read. Renormalised over those tokens
they are the restricted softmax of the logits, so :class:`SliceReadout` computes the
same expected value and spread. The prompt is exactly the transformers path's: both
runners check the token ids vLLM builds against the local processor's once.

The tokenizer, processor and model card always come from the local model directory
(the weights are only read by vLLM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from PIL import Image

from inference.card import ModelCard
from inference.errors import EngineError
from inference.vlm.loading import load_processor
from inference.vlm.prompting import ScoreTokens, prompt_text, score_tokens
from inference.vlm.readout import SliceReadout, renormalised
from inference.vlm.source import ModelSource


@dataclass(frozen=True)
class VllmOptions:
    """How to run vLLM (host settings: results do not depend on them).

    Attributes
    ----------
    url
        Base URL of a ``vllm serve`` (``http://host:port``); None runs vLLM in process.
    served_model
        The model name the server knows (``--served-model-name`` or a ``--lora-modules``
        name); None picks it from ``/v1/models`` (the LoRA module whose path is the
        adapter directory, else the base model).
    concurrency
        Requests in flight per engine (server mode); vLLM batches them.
    timeout
        Seconds per HTTP request.
    max_model_len, gpu_memory_utilization, max_num_seqs, dtype, enforce_eager
        In-process ``vllm.LLM`` settings (``max_model_len`` None: the model's own).
    """

    url: str | None = None
    served_model: str | None = None
    concurrency: int = 64
    timeout: float = 600.0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    dtype: str = "auto"
    enforce_eager: bool = False


@dataclass(frozen=True)
class Query:
    """One teacher-forced continuation of the prompt and the tokens read after it.

    Attributes
    ----------
    continuation
        Token ids appended to the prompt (in process).
    text
        The same continuation as the assistant turn's text (server mode,
        ``continue_final_message``).
    read_ids
        The tokens whose log-probabilities are read at the next position.
    """

    continuation: tuple[int, ...]
    text: str
    read_ids: tuple[int, ...]


@dataclass(frozen=True)
class PromptSpec:
    """What the runners need to build prompts exactly as the transformers path does."""

    card: ModelCard
    processor: Any
    tokens: ScoreTokens
    text: str
    ids: tuple[int, ...]

    def expanded_ids(self, image: Image.Image) -> list[int]:
        """The prompt's token ids with the image tokens, as the local processor builds them."""
        batch = self.processor(text=[self.text], images=[[image]], return_tensors="np")
        return [int(i) for i in batch["input_ids"][0]]


class Runner(Protocol):
    """A vLLM runtime: in process or over HTTP."""

    def score(
        self, images: Sequence[Image.Image], queries: Sequence[Query]
    ) -> list[list[dict[int, float]]]:
        """Per image, per query: log-probability of each of the query's ``read_ids``."""
        ...

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """The generated answer per image (special tokens skipped, stripped)."""
        ...


def readout_queries(card: ModelCard, tokens: ScoreTokens) -> list[Query]:
    """The digit query, then (``Score: X.X`` cards) one decimal query per digit below the top."""
    digit = Query(tokens.prefix_ids, card.answer_prefix, tokens.digit_ids)
    if not tokens.decimal_ids:
        return [digit]
    separator = card.score_format.separator
    decimals = [
        Query((*tokens.prefix_ids, d, *tokens.separator_ids),
              card.answer_prefix + s + separator, tokens.decimal_ids)
        for d, s in zip(tokens.digit_ids[:-1], card.score_tokens[:-1], strict=True)
    ]
    return [digit, *decimals]


def readout_from_logprobs(
    tokens: ScoreTokens, answers: Sequence[Mapping[int, float]]
) -> SliceReadout:
    """The slice's score distribution from the queries' log-probabilities.

    ``answers[0]`` holds the digits' log-probabilities after the answer prefix,
    ``answers[1 + d]`` the decimal digits' after ``d`` and the separator.
    """
    digits = renormalised(_pick(answers[0], tokens.digit_ids))
    if not tokens.decimal_ids:
        return SliceReadout.from_digits(digits)
    if len(answers) != len(tokens.digit_ids):
        raise EngineError(f"expected {len(tokens.digit_ids)} read-out answers, got {len(answers)}")
    decimals = [renormalised(_pick(a, tokens.decimal_ids)) for a in answers[1:]]
    return SliceReadout.from_digits(digits, [*decimals, [1.0]])  # the top score: only .0


def _pick(logprobs: Mapping[int, float], ids: Sequence[int]) -> list[float]:
    missing = [i for i in ids if i not in logprobs]
    if missing:
        raise EngineError(f"vLLM returned no log-probability for token ids {missing}")
    values = [float(logprobs[i]) for i in ids]
    if all(v == float("-inf") for v in values):
        raise EngineError(
            "vLLM gave every score token probability 0; the read-out needs raw "
            "log-probabilities (run the server with the default --logprobs-mode)"
        )
    return values


class VllmBackend:
    """:class:`~inference.vlm.backend.ScoringBackend` on vLLM; loads on first use.

    Parameters
    ----------
    source
        The checked local model (and adapter) directories with the card.
    options
        Server URL or in-process settings.
    """

    def __init__(self, source: ModelSource, options: VllmOptions | None = None) -> None:
        self._source = source
        self.options = options or VllmOptions()

    @cached_property
    def spec(self) -> PromptSpec:
        """Processor, score tokens and prompt ids from the local directories."""
        processor = load_processor(self._source)
        card = self._source.card
        text = prompt_text(processor, card)
        tokens = score_tokens(processor.tokenizer, card, text)
        ids = tuple(int(i) for i in processor.tokenizer(text)["input_ids"])
        return PromptSpec(card, processor, tokens, text, ids)

    @cached_property
    def runner(self) -> Runner:
        """The vLLM runtime: a server client when ``url`` is set, else ``vllm.LLM``."""
        if self.options.url is not None:
            from inference.vlm.vllm_server import ServerRunner

            return ServerRunner(self.spec, self._source, self.options)
        from inference.vlm.vllm_local import LocalRunner

        return LocalRunner(self.spec, self._source, self.options)

    def read_scores(self, images: Sequence[Image.Image]) -> list[SliceReadout]:
        """The score distribution of every image: the digit queries, then the decimal ones.

        Two rounds so that the decimal queries find each slice's prompt (image
        included) in vLLM's prefix cache instead of computing it four more times side
        by side; within a round every request goes at once and vLLM batches them.
        """
        if not images:
            return []
        digit, *decimals = readout_queries(self.spec.card, self.spec.tokens)
        answers = self.runner.score(images, [digit])
        if decimals:
            more = self.runner.score(images, decimals)
            answers = [[*a, *m] for a, m in zip(answers, more, strict=True)]
        return [readout_from_logprobs(self.spec.tokens, row) for row in answers]

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """The generated answers (greedy unless the card says otherwise)."""
        if not images:
            return []
        return self.runner.generate(images)
