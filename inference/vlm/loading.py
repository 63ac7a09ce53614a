"""Load MedGemma (Gemma 3 + SigLIP) from local directories only, 4-bit NF4, plus a LoRA adapter.

Nothing is fetched from a model hub: the offline switches are set before transformers
is imported and every ``from_pretrained`` gets ``local_files_only=True``. A hub id or a
missing directory fails fast with :class:`ModelDirectoryError`, which names the
local-path option (``--model DIR``).

Precision: NF4 4-bit with double quantisation; compute in bf16 on a GPU, fp32 on the
CPU (fp16 gives empty or ``<pad>`` output with Gemma 3).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from inference.card import CARD_FILENAME, DEFAULT_CARD, ModelCard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # after the offline switches

log = structlog.get_logger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HUB_HINT = (
    "qcnode loads models only from a local directory: download the model once "
    "(e.g. `hf download google/medgemma-4b-it --local-dir DIR` after accepting its terms) "
    "and pass --model DIR"
)


class ModelDirectoryError(ValueError):
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
        looks_hub = isinstance(value, str | Path) and re.fullmatch(
            r"[\w.\-]+/[\w.\-]+", str(value)
        ) is not None
        if looks_hub and what == "model":
            raise ModelDirectoryError(
                f"{value!s} looks like a model hub id, not a directory; {_HUB_HINT}"
            )
        hint = _HUB_HINT if what == "model" else f"pass an existing directory as {option}"
        raise ModelDirectoryError(f"{what} directory {value!s} does not exist; {hint}")
    if not path.is_dir():
        raise ModelDirectoryError(f"{what} path {path} is not a directory ({option})")
    if not (path / marker).is_file():
        raise ModelDirectoryError(
            f"{what} directory {path} has no {marker}; is it a complete {what} download? "
            f"({option})"
        )
    return path.resolve()


def pick_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelDirectoryError(f"device {device!r} requested but no CUDA GPU is visible")
    return device


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def quantization_config(device: str) -> Any:
    """``BitsAndBytesConfig``: NF4, double quantisation, compute dtype per device."""
    from transformers import BitsAndBytesConfig

    config_class: Any = BitsAndBytesConfig
    return config_class(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def load_processor(source: ModelSource) -> Any:
    """The processor (tokenizer + image processor), from the adapter dir if it has one."""
    from transformers import AutoProcessor

    auto: Any = AutoProcessor
    where = source.model_dir
    if source.adapter_dir is not None and (source.adapter_dir / "tokenizer_config.json").is_file():
        where = source.adapter_dir
    processor = auto.from_pretrained(where, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return processor


def load_model(source: ModelSource, device: str, *, quantize: bool = True) -> Any:
    """The model in eval mode: 4-bit base (unless ``quantize`` is false) + the adapter."""
    from transformers import AutoModelForImageTextToText

    auto: Any = AutoModelForImageTextToText
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(device),
        "device_map": {"": device},
        "local_files_only": True,
    }
    if quantize:
        kwargs["quantization_config"] = quantization_config(device)
    model: Any = auto.from_pretrained(source.model_dir, **kwargs)
    if source.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter_dir, is_trainable=False)
    model.eval()
    _check_image_size(model, source.card)
    log.info(
        "vlm_loaded", device=device, quantized=quantize,
        adapter=source.adapter_dir is not None, card_found=source.card_found,
    )
    return model


def _check_image_size(model: Any, card: ModelCard) -> None:
    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if size is not None and size != card.image_size:
        raise ModelDirectoryError(
            f"model card image_size {card.image_size} does not match the vision tower's "
            f"{size} px: the card in {CARD_FILENAME} belongs to other weights"
        )


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
