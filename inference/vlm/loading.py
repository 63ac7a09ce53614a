"""Load MedGemma (Gemma 3 + SigLIP) from local directories only, 4-bit NF4, plus a LoRA adapter.

Nothing is fetched from a model hub: the offline switches are set before transformers
is imported and every ``from_pretrained`` gets ``local_files_only=True``. The directories
are checked by the torch-free :mod:`inference.vlm.source` (re-exported here): a hub id or
a missing directory fails fast with :class:`ModelDirectoryError`, which names the
local-path option (``--model DIR``).

Precision: NF4 4-bit with double quantisation; compute in bf16 on a GPU, fp32 on the
CPU (fp16 gives empty or ``<pad>`` output with Gemma 3).
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from inference.card import CARD_FILENAME, ModelCard
from inference.vlm.source import (
    ModelDirectoryError,
    ModelSource,
    resolve_source,
    weights_revision,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # after the offline switches

log = structlog.get_logger(__name__)

__all__ = [
    "ModelDirectoryError", "ModelSource", "compute_dtype", "load_model", "load_processor",
    "native_image_size", "pick_device", "quantization_config", "resolve_source",
    "weights_revision",
]


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
    if source.card_found:  # without a card, the engine takes the size from the model
        _check_image_size(model, source.card)
    log.info(
        "vlm_loaded", device=device, quantized=quantize,
        adapter=source.adapter_dir is not None, card_found=source.card_found,
    )
    return model


def native_image_size(model: Any, processor: Any) -> tuple[int, str] | None:
    """The side of the square image these weights take, and where it was read: the
    processor's image processor (what images are resized to), else the vision tower's
    config; None when neither says."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    # a dict in older transformers, a SizeDict (attributes) in newer ones
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    if isinstance(height, int):
        return height, "image processor"
    vision = getattr(model.config, "vision_config", None)
    side = getattr(vision, "image_size", None)
    return (int(side), "vision config") if isinstance(side, int) else None


def _check_image_size(model: Any, card: ModelCard) -> None:
    """A card found beside the weights must describe them (its image size is theirs)."""
    vision = getattr(model.config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if size is not None and size != card.image_size:
        raise ModelDirectoryError(
            f"model card image_size {card.image_size} does not match the vision tower's "
            f"{size} px: the card in {CARD_FILENAME} belongs to other weights"
        )
