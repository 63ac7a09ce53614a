"""Local model and adapter directories, checked before anything heavy is imported.

Torch-free: :func:`inference.engine.create_engine` calls :func:`resolve_source` first, so
a hub id or a missing directory fails in a fraction of a second with the one message
that names the problem and the local-path option (``--model DIR``), before torch and
transformers are imported.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from inference.card import DEFAULT_CARD, ModelCard
from inference.errors import EngineError

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID_RE = re.compile(r"[\w.\-]+/[\w.\-]+")
HUB_HINT = (
    "qcnode loads models only from a local directory: download the model once "
    "(e.g. `hf download google/medgemma-4b-it --local-dir DIR` after accepting its terms) "
    "and pass --model DIR"
)


class ModelDirectoryError(EngineError, ValueError):
    """A model or adapter directory is missing, is a hub id, or holds no usable weights."""


@dataclass(frozen=True)
class ModelSource:
    """Validated local directories and the card that goes with them."""

    model_dir: Path
    adapter_dir: Path | None
    card: ModelCard
    card_found: bool


def resolve_source(model_dir: Path | str, adapter_dir: Path | str | None = None) -> ModelSource:
    """Check the directories (no torch work) and pick the model card.

    The card is read from the adapter directory, else from the model directory (a
    merged model), else :data:`~inference.card.DEFAULT_CARD` is used.

    Raises
    ------
    ModelDirectoryError
        If a directory does not exist, looks like a hub id, or lacks its config file.
    inference.card.CardError
        If the card beside the weights is unreadable or invalid.
    """
    model = _check_dir(model_dir, "model", "config.json", "--model DIR")
    adapter = (
        None if adapter_dir is None
        else _check_dir(adapter_dir, "adapter", "adapter_config.json", "--adapter DIR")
    )
    if adapter is None and (model / "adapter_config.json").is_file():
        raise ModelDirectoryError(
            f"{model} holds a LoRA adapter, not a model: pass the base model as --model DIR "
            "and this directory as --adapter DIR"
        )
    card = ModelCard.find(adapter, model)
    return ModelSource(model, adapter, card or DEFAULT_CARD, card is not None)


def _check_dir(value: Path | str, what: str, marker: str, option: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        if what == "model" and _HUB_ID_RE.fullmatch(str(value)) is not None:
            raise ModelDirectoryError(
                f"{value!s} looks like a model hub id, not a directory; {HUB_HINT}"
            )
        hint = HUB_HINT if what == "model" else f"pass an existing directory as {option}"
        raise ModelDirectoryError(f"{what} directory {value!s} does not exist; {hint}")
    if not path.is_dir():
        raise ModelDirectoryError(f"{what} path {path} is not a directory ({option})")
    if not (path / marker).is_file():
        raise ModelDirectoryError(
            f"{what} directory {path} has no {marker}; is it a complete {what} download? "
            f"({option})"
        )
    return path.resolve()


def weights_revision(directory: Path) -> str:
    """A revision for the weights in ``directory``.

    A hub snapshot directory is named by its commit; otherwise the SHA-256 of the
    weight files (names and contents), shortened, prefixed ``sha256:``.
    """
    if _COMMIT_RE.match(directory.name):
        return directory.name
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ModelDirectoryError(f"no weight files (*.safetensors, *.bin) in {directory}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]
