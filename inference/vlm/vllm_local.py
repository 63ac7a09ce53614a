"""vLLM in the GPU worker's own process (``vllm.LLM``).

Prompts go in as token ids (the transformers path's prompt ids with ``<start_of_image>``,
which vLLM's Gemma 3 processor expands to the image tokens) plus the image, so the
teacher-forced continuation is exactly the transformers path's; the ids vLLM ends up
with are checked against the local processor's once. A LoRA adapter is applied per
request (``LoRARequest``); a merged model directory needs none.

vLLM starts its engine core in a child process unless ``VLLM_ENABLE_V1_MULTIPROCESSING``
is 0; a daemonic process (a Celery prefork child) cannot have children, so there the
engine core runs in the worker's process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence
from functools import cached_property
from importlib import import_module
from typing import Any

import structlog
from PIL import Image

from inference.errors import EngineError
from inference.vlm.source import ModelSource
from inference.vlm.vllm_backend import PromptSpec, Query, VllmOptions

log = structlog.get_logger(__name__)

#: vLLM's allowed ``max_lora_rank`` values (``vllm.config.lora.MaxLoRARanks``).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_NAME = "qcnode-adapter"


class LocalRunner:
    """``vllm.LLM`` on the local device; built on first use."""

    def __init__(self, spec: PromptSpec, source: ModelSource, options: VllmOptions) -> None:
        self._spec = spec
        self._source = source
        self._options = options
        self._checked = False

    @cached_property
    def llm(self) -> Any:
        """The vLLM engine (weights load here)."""
        if multiprocessing.current_process().daemon:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm: Any = import_module("vllm")
        opts, adapter = self._options, self._source.adapter_dir
        kwargs: dict[str, Any] = {
            "model": str(self._source.model_dir),
            "tokenizer": str(self._source.model_dir),
            "dtype": opts.dtype,
            "max_num_seqs": opts.max_num_seqs,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": 1},
            "enable_prefix_caching": True,
            "seed": 0,
            "enforce_eager": opts.enforce_eager,
        }
        if opts.max_model_len is not None:
            kwargs["max_model_len"] = opts.max_model_len
        if adapter is not None:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(adapter))
        llm = vllm.LLM(**kwargs)
        log.info("vllm_loaded", mode="in_process", adapter=adapter is not None)
        return llm

    @cached_property
    def lora(self) -> Any:
        """The adapter as a ``LoRARequest`` (None for a merged or base model)."""
        if self._source.adapter_dir is None:
            return None
        request: Any = import_module("vllm.lora.request")
        return request.LoRARequest(_LORA_NAME, 1, str(self._source.adapter_dir))

    def score(
        self, images: Sequence[Image.Image], queries: Sequence[Query]
    ) -> list[list[dict[int, float]]]:
        """One request per image and query, all in one ``generate`` call."""
        vllm: Any = import_module("vllm")
        prompts = [self._prompt(im, q.continuation) for im in images for q in queries]
        params = [
            vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(q.read_ids))
            for _ in images for q in queries
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        self._check_prompt(images[0], queries[0], outs[0].prompt_token_ids)
        flat = [{int(k): float(v.logprob) for k, v in o.outputs[0].logprobs[0].items()}
                for o in outs]
        n = len(queries)
        return [flat[i * n:(i + 1) * n] for i in range(len(images))]

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """Greedy (or the model's default sampling) answers of at most ``max_new_tokens``."""
        vllm: Any = import_module("vllm")
        card = self._spec.card
        params = vllm.SamplingParams(
            max_tokens=card.max_new_tokens, temperature=0.0 if card.greedy else 1.0,
            skip_special_tokens=True,
        )
        prompts = [self._prompt(im, ()) for im in images]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        return [str(o.outputs[0].text).strip() for o in outs]

    def _prompt(self, image: Image.Image, continuation: Sequence[int]) -> dict[str, Any]:
        return {"prompt_token_ids": [*self._spec.ids, *continuation],
                "multi_modal_data": {"image": image}}

    def _check_prompt(self, image: Image.Image, query: Query, built: Sequence[int]) -> None:
        """Once: vLLM's expanded prompt must be the local processor's, token for token."""
        if self._checked:
            return
        expected = [*self._spec.expanded_ids(image), *query.continuation]
        if list(built) != expected:
            raise EngineError(
                "vLLM built a different prompt than the transformers processor "
                f"({len(built)} vs {len(expected)} tokens); the read-out would not mean "
                "the same thing"
            )
        self._checked = True


def lora_rank(adapter_dir: Any) -> int:
    """The smallest ``max_lora_rank`` vLLM allows that fits the adapter's rank ``r``."""
    from pathlib import Path

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    rank = int(config.get("r", 16))
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise EngineError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")
