"""The scoring backend: what :class:`~inference.vlm.engine.VlmEngine` asks of a model runtime.

Two implementations: the engine's own transformers path (NF4 + peft, the default,
:mod:`inference.vlm.readout`) and vLLM (:mod:`inference.vlm.vllm_backend`, in process or
a ``vllm serve`` addressed by URL). Both return the same :class:`SliceReadout` (the score
distribution of each slice) and the same generated answers, so the engine's aggregation,
explanation choice and parsing do not depend on the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from inference.vlm.readout import SliceReadout

#: ``[engine] backend``: the runtime that runs the VLM.
BackendName = Literal["transformers", "vllm"]
BACKEND_NAMES: tuple[BackendName, ...] = ("transformers", "vllm")


@runtime_checkable
class ScoringBackend(Protocol):
    """Reads score distributions and generates answers for prompt images."""

    def read_scores(self, images: Sequence[Image.Image]) -> list[SliceReadout]:
        """The score distribution of every image (the card's prompt, ``Score: `` forced)."""
        ...

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """The model's full answer (score and reasoning) for every image."""
        ...
