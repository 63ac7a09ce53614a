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
    explain: ExplainPolicy | None = None, backend: str = "transformers",
    vllm_url: str | None = None, vllm_model: str | None = None,
) -> Engine:
    """Build the engine called ``name`` ("physics" or "vlm").

    The VLM needs a local ``model`` directory (and optionally a LoRA ``adapter``
    directory); nothing is fetched from a hub. ``max_batch`` bounds the slices per
    forward pass (default: the model card's). ``explain`` is the VLM's
    :class:`~inference.vlm.policy.ExplainPolicy` (default: explain every series).
    forward pass (default: the model card's). ``backend`` runs the VLM on transformers
    (NF4 + peft, in process) or on ``"vllm"``: in process, or the ``vllm serve`` at
    ``vllm_url`` (``vllm_model``: the served model name, default from the server).

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
        checked = source.resolve_source(model, adapter)  # torch-free: fails before torch
        runtime = _vlm_backend(backend, checked, vllm_url, vllm_model)
        vlm: Any = import_module("inference.vlm")
        engine: Engine = vlm.VlmEngine(model, adapter, device=device, max_batch=max_batch,
                                       explain=explain, backend=runtime)
        return engine
    raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")


def _vlm_backend(
    backend: str, source: Any, vllm_url: str | None, vllm_model: str | None
) -> Any:
    """None for transformers (the engine's own path), else a :class:`VllmBackend`."""
    if backend == "transformers":
        if vllm_url is not None:
            raise EngineError("vllm_url is set but the backend is 'transformers'")
        return None
    if backend != "vllm":
        raise EngineError(f"unknown VLM backend {backend!r}; choose transformers or vllm")
    vb: Any = import_module("inference.vlm.vllm_backend")
    return vb.VllmBackend(source, vb.VllmOptions(url=vllm_url, served_model=vllm_model))


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
