"""The engine protocol and the factory that builds engines by name.

``physics`` (the embedded default, numpy/scipy) is always available; ``vlm`` imports
:mod:`inference.vlm` (torch, transformers) only when asked for, so callers that only use
the physics engine never import torch.

Errors: everything that stops an engine from being built is an :class:`EngineError`
(:class:`~inference.card.CardError`, :class:`~inference.vlm.source.ModelDirectoryError`
and :class:`~inference.vlm.prompting.PromptError` are subclasses, and also
``ValueError``). The VLM's directories are checked by the torch-free
:func:`inference.vlm.source.resolve_source` before torch is imported, so a hub id or a
missing directory fails at once with the message that names ``--model DIR``.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from inference.errors import EngineError
from inference.prepare import PreparedSeries, Window
from inference.result import AssessmentResult, EngineInfo
from inference.vlm.policy import ExplainPolicy

__all__ = ["ENGINE_NAMES", "Engine", "EngineError", "create_engine", "engine_window"]

ENGINE_NAMES = ("physics", "vlm")


@runtime_checkable
class Engine(Protocol):
    """Anything that turns a prepared series into an assessment."""

    @property
    def info(self) -> EngineInfo:
        """Name, version and model/adapter revision (used in job keys and the SR)."""
        ...

    def assess(self, series: PreparedSeries) -> AssessmentResult:
        """Assess one prepared series."""
        ...


def create_engine(
    name: str, *, model: Path | None = None, adapter: Path | None = None,
    device: str = "auto", max_batch: int | None = None,
    explain: ExplainPolicy | None = None,
) -> Engine:
    """Build the engine called ``name`` ("physics" or "vlm").

    The VLM needs a local ``model`` directory (and optionally a LoRA ``adapter``
    directory); nothing is fetched from a hub. ``max_batch`` bounds the slices per
    forward pass (default: the model card's). ``explain`` is the VLM's
    :class:`~inference.vlm.policy.ExplainPolicy` (default: explain every series).

    Raises
    ------
    EngineError
        For an unknown name, a missing ``model``, a hub id or missing directory
        (:class:`~inference.vlm.source.ModelDirectoryError`) or a bad model card
        (:class:`~inference.card.CardError`).
    """
    if name == "physics":
        from inference.physics import PhysicsEngine

        return PhysicsEngine()
    if name == "vlm":
        if model is None:
            raise EngineError("the vlm engine needs --model DIR (a local model directory)")
        source: Any = import_module("inference.vlm.source")
        source.resolve_source(model, adapter)  # torch-free: fails before torch loads
        vlm: Any = import_module("inference.vlm")
        engine: Engine = vlm.VlmEngine(model, adapter, device=device, max_batch=max_batch,
                                       explain=explain)
        return engine
    raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")


def engine_window(
    name: str, *, model: Path | None = None, adapter: Path | None = None
) -> Window:
    """The display window an engine expects (the VLM's comes from its model card)."""
    if name == "physics":
        return Window()
    if name != "vlm":
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    card_module: Any = import_module("inference.card")
    card: Any = card_module.DEFAULT_CARD
    for directory in (adapter, model):
        if directory is not None and (Path(directory) / "qcnode_card.json").is_file():
            card = card_module.ModelCard.load(Path(directory))
            break
    return _card_window(card)


def _card_window(card: Any) -> Window:
    window = getattr(card, "window", None)
    if isinstance(window, Window):
        return window
    return Window(
        center=float(card.window_center),
        width=float(card.window_width),
        mode=getattr(card, "window_mode", "single"),
    )
