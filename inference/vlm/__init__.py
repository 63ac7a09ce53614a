"""The MedGemma VLM engine (torch, transformers, peft, bitsandbytes).

Modules: :mod:`~inference.vlm.source` (local directories, torch-free),
:mod:`~inference.vlm.loading` (4-bit, adapter),
:mod:`~inference.vlm.prompting` (card → prompt and inputs, shared with training),
:mod:`~inference.vlm.readout` (score probabilities, generation),
:mod:`~inference.vlm.parsing` and :mod:`~inference.vlm.findings` (torch-free text
handling), :mod:`~inference.vlm.engine` (:class:`VlmEngine`); the vLLM runtime behind
:mod:`~inference.vlm.backend`: :mod:`~inference.vlm.vllm_backend` (read-out from
log-probabilities), :mod:`~inference.vlm.vllm_local` (``vllm.LLM``) and
:mod:`~inference.vlm.vllm_server` (a ``vllm serve`` by URL).

Attributes are imported lazily so that ``inference.vlm.source``, ``inference.vlm.parsing``
and ``inference.vlm.findings`` can be used without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "VlmEngine": "inference.vlm.engine",
    "LoadedModel": "inference.vlm.engine",
    "ModelDirectoryError": "inference.vlm.source",
    "PromptError": "inference.vlm.prompting",
}

__all__ = ["LoadedModel", "ModelDirectoryError", "PromptError", "VlmEngine"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
