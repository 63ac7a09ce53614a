"""The engine protocol and the factory that builds engines by name.

``physics`` (the embedded default, numpy/scipy) is always available; ``vlm`` imports
:mod:`inference.vlm` (torch, transformers) only when asked for, so callers that only use
the physics engine never import torch.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from inference.prepare import PreparedSeries, Window
from inference.result import AssessmentResult, EngineInfo

ENGINE_NAMES = ("physics", "vlm")


class EngineError(RuntimeError):
    """An engine cannot be built or used (bad name, missing model directory, …)."""


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


def _check_dir(path: Path | None, what: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise EngineError(f"{what} directory {path} does not exist (give a local directory)")


def create_engine(
    name: str, *, model: Path | None = None, adapter: Path | None = None,
    device: str = "auto",
) -> Engine:
    """Build the engine called ``name`` ("physics" or "vlm").

    The VLM needs a local ``model`` directory (and optionally a LoRA ``adapter``
    directory); nothing is fetched from a hub.
    """
    if name == "physics":
        from inference.physics import PhysicsEngine

        return PhysicsEngine()
    if name == "vlm":
        if model is None:
            raise EngineError("the vlm engine needs --model DIR (a local model directory)")
        _check_dir(model, "model")
        _check_dir(adapter, "adapter")
        vlm: Any = import_module("inference.vlm")
        engine: Engine = vlm.VlmEngine(model, adapter, device=device)
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
