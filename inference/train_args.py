"""Arguments of ``qcnode train``: three sections (model, data, training), from TOML/JSON.

Example ``train.toml``::

    [model]
    model_dir = "/models/medgemma-4b-it"        # local snapshot, never a hub id
    base_model_revision = "<40-hex commit of the snapshot>"

    [data]
    manifest = "/data/ldctiqa/ldctiqa.jsonl"

    [training]
    output_dir = "/models/adapters/ldctiqa-r16"
    num_train_epochs = 3
    per_device_train_batch_size = 1
    gradient_accumulation_steps = 16
    learning_rate = 2e-4

``qcnode train --recipe published`` starts from the published recipe (seed 000's
``trainSFT.py``): LoRA on all linear layers (the SigLIP tower included), gradient
clipping at 0.3, batch 4 × 4 accumulation, and an eval loss every 50 steps on a fixed
sample of at most 100 records of the ``val`` split (import the authors' split lists with
``qcnode train data splits``). A file and ``--set`` overrides still apply on top.

Torch-free, so the arguments can be checked on any host.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

#: LoRA on the decoder's attention and MLP projections only (not the SigLIP tower).
DEFAULT_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


class TrainArgsError(ValueError):
    """A training-argument file or override is invalid (message names the key)."""


@dataclass
class ModelArguments:
    """Which weights to adapt, and how (QLoRA: NF4 4-bit base + LoRA)."""

    model_dir: str = ""
    base_model: str = "google/medgemma-4b-it"
    base_model_revision: str | None = None  # recorded in the card; default: weights hash
    card: str | None = None  # JSON card to start from; default: the published recipe
    load_in_4bit: bool = True
    attn_implementation: str = "eager"  # advised for Gemma 3 training
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = DEFAULT_TARGETS  # a regex on module names, or "all-linear"


@dataclass
class DataArguments:
    """The labelled images (a JSONL manifest, :mod:`inference.dataset`)."""

    manifest: str = ""
    train_split: str | None = "train"  # None: every record
    #: records of this split give an eval loss (None: no evaluation); a fixed sample of
    #: at most ``eval_max_records``, drawn once with ``eval_seed``
    eval_split: str | None = None
    eval_max_records: int = 100
    eval_seed: int = 42
    require_explanations: bool = True  # else score-only answers ("Reasoning: " empty)
    max_records: int | None = None


@dataclass
class TrainingArguments:
    """The optimisation (defaults: the published recipe, effective batch 16)."""

    output_dir: str = "qcnode-adapter"
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides the epochs
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    eval_steps: int = 50  # eval loss every N optimizer steps and at the end (with eval_split)
    gradient_checkpointing: bool = True
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int = 2
    seed: int = 42
    device: str = "auto"
    resume_from: str | None = None  # a checkpoint directory, or "latest"


@dataclass
class TrainArgs:
    """All of ``qcnode train``'s arguments."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sections as sub-dicts)."""
        return asdict(self)

    def check(self) -> None:
        """Raise :class:`TrainArgsError` for values that cannot work."""
        problems = []
        if not self.model.model_dir:
            problems.append("model.model_dir is required (a local model directory)")
        if not self.data.manifest:
            problems.append("data.manifest is required (a JSONL manifest)")
        if self.model.lora_r < 1 or self.model.lora_alpha <= 0:
            problems.append("model.lora_r and model.lora_alpha must be positive")
        if not 0 <= self.model.lora_dropout < 1:
            problems.append("model.lora_dropout must be in [0, 1)")
        t = self.training
        if t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1:
            problems.append("training batch size and accumulation steps must be >= 1")
        if t.max_steps <= 0 and t.num_train_epochs <= 0:
            problems.append("training.num_train_epochs or training.max_steps must be positive")
        if t.learning_rate <= 0:
            problems.append("training.learning_rate must be positive")
        if t.max_grad_norm <= 0:
            problems.append("training.max_grad_norm must be positive")
        if self.data.eval_split is not None and self.data.eval_split == self.data.train_split:
            problems.append("data.eval_split must differ from data.train_split")
        if self.data.eval_max_records < 1 or t.eval_steps < 0:
            problems.append("data.eval_max_records must be >= 1 and training.eval_steps >= 0")
        if problems:
            raise TrainArgsError("; ".join(problems))


#: The published recipe's settings (REFERENCES.md; seed 000's trainSFT.py), as overrides.
RECIPES: dict[str, tuple[str, ...]] = {
    "published": (
        'model.lora_target_modules="all-linear"', "training.max_grad_norm=0.3",
        "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=4",
        'data.eval_split="val"', "training.eval_steps=50", "data.eval_max_records=100",
    ),
}

_SECTIONS = {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments}


def _set(args: TrainArgs, section: str, key: str, value: Any) -> None:
    if section not in _SECTIONS:
        raise TrainArgsError(f"unknown section [{section}]; known: {', '.join(_SECTIONS)}")
    target = getattr(args, section)
    names = {f.name: f for f in fields(target)}
    if key not in names:
        raise TrainArgsError(f"unknown key {section}.{key}; known: {', '.join(names)}")
    current = getattr(target, key)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise TrainArgsError(f"{section}.{key} must be true or false, got {value!r}")
    if isinstance(current, int | float) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TrainArgsError(f"{section}.{key} must be a number, got {value!r}")
        value = type(current)(value)
    setattr(target, key, value)


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def load_train_args(path: Path | None = None, overrides: list[str] | None = None,
                    recipe: str | None = None) -> TrainArgs:
    """Arguments from a recipe (:data:`RECIPES`), then a TOML or JSON file (sections
    model/data/training), then overrides.

    ``overrides`` are ``section.key=value`` strings; the value is parsed as JSON when it
    can be (numbers, true/false, null), else taken as text.
    """
    if recipe is not None and recipe not in RECIPES:
        raise TrainArgsError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    args = TrainArgs()
    for item in RECIPES.get(recipe or "", ()):
        name, _, raw = item.partition("=")
        section, _, key = name.partition(".")
        _set(args, section, key, _parse_value(raw))
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise TrainArgsError(f"{path}: {exc}") from exc
        sections: dict[str, Any] = data
        for section, values in sections.items():
            if not isinstance(values, dict):
                raise TrainArgsError(f"{path}: [{section}] must be a table of keys")
            for key, value in values.items():
                _set(args, section, key, value)
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise TrainArgsError(f"override {item!r} is not SECTION.KEY=VALUE")
        _set(args, section, key, _parse_value(raw))
    return args
