"""``qcnode train``: QLoRA supervised fine-tuning of MedGemma-4B-IT on quality scores.

The base model is loaded 4-bit NF4 (double quantisation; bf16 compute on a GPU, fp32 on
the CPU), prepared for k-bit training with gradient checkpointing, and LoRA adapters
(default r 16, alpha 16, dropout 0.05) are put on the language model's projection
layers only (a regex on ``language_model``; the SigLIP tower stays frozen). The loss
covers the answer tokens only (:mod:`inference.train_data`). The run writes into
``training.output_dir``: the adapter, ``qcnode_card.json`` (the card inference reads, so
prompt, window and answer format cannot drift), ``training_log.csv``, ``loss.png``,
``train_args.json`` and ``checkpoint-N/`` directories it can resume from.

Launch (single GPU)::

    qcnode train --args train.toml
    qcnode train --model /models/medgemma-4b-it --manifest ldctiqa.jsonl \\
        --output adapters/ldctiqa --set training.num_train_epochs=3
    qcnode train --args train.toml --resume latest        # after an interruption

Launch (several GPUs on one host, data parallel; one 4-bit copy per GPU)::

    accelerate launch --num_processes 2 -m inference.train --args train.toml

The effective batch is ``per_device_train_batch_size × gradient_accumulation_steps ×
processes``; keep it at 16 (the published recipe) when you change the number of GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import torch

from inference.card import DEFAULT_CARD, ModelCard
from inference.dataset import ManifestError, Record, read_manifest
from inference.train_args import TrainArgs, TrainArgsError, load_train_args
from inference.train_data import ExampleDataset, TrainDataError, collate
from inference.train_loop import Trainer, TrainState, latest_checkpoint, write_log

log = structlog.get_logger(__name__)


def _device(requested: str, process_index: int) -> str:
    if requested != "auto":
        return requested
    return f"cuda:{process_index}" if torch.cuda.is_available() else "cpu"


def base_card(args: TrainArgs, model_config: Any) -> ModelCard:
    """The card to train with: given file, else the model dir's, else the default; its
    image size follows the vision tower's."""
    if args.model.card:
        card = ModelCard.from_dict(json.loads(Path(args.model.card).read_text("utf-8")))
    else:
        card = ModelCard.find(Path(args.model.model_dir)) or DEFAULT_CARD
    size = getattr(getattr(model_config, "vision_config", None), "image_size", None)
    return replace(card, image_size=int(size) if size else card.image_size,
                   base_model=args.model.base_model)


def load_for_training(args: TrainArgs, device: str) -> tuple[Any, Any]:
    """(peft model with trainable LoRA, processor) from the local base directory."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    from inference.vlm.loading import (
        compute_dtype,
        load_processor,
        quantization_config,
        resolve_source,
    )

    source = resolve_source(args.model.model_dir)
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(device), "device_map": {"": device},
        "local_files_only": True, "attn_implementation": args.model.attn_implementation,
    }
    if args.model.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(device)
    model: Any = AutoModelForImageTextToText.from_pretrained(source.model_dir, **kwargs)
    model.config.use_cache = False
    if args.model.load_in_4bit:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=args.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif args.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=args.model.lora_r, lora_alpha=args.model.lora_alpha,
        lora_dropout=args.model.lora_dropout, target_modules=args.model.lora_target_modules,
        bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    processor = load_processor(source)
    processor.tokenizer.padding_side = "right"
    return model, processor


@dataclass(frozen=True)
class TrainOutcome:
    """What a run produced: its state (loss history), the trained model and its card."""

    state: TrainState
    model: Any
    processor: Any
    card: ModelCard
    output_dir: Path


def run(args: TrainArgs, *, process_index: int = 0) -> TrainOutcome:
    """Train per ``args``; returns the outcome (the adapter is saved in output_dir)."""
    args.check()
    torch.manual_seed(args.training.seed)
    records = read_manifest(Path(args.data.manifest), split=args.data.train_split,
                            check_images=True)
    if args.data.max_records:
        records = records[: args.data.max_records]
    device = _device(args.training.device, process_index)
    model, processor = load_for_training(args, device)
    card = base_card(args, model.config)
    dataset = ExampleDataset(processor, card, records,
                             require_explanations=args.data.require_explanations)
    evaluation = None
    if args.data.eval_split is not None:
        evaluation = ExampleDataset(processor, card, eval_records(args),
                                    require_explanations=args.data.require_explanations)
    out = Path(args.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_args.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    pad_id = int(processor.tokenizer.pad_token_id)
    trainer = Trainer(model, dataset, args.training, lambda b: collate(b, pad_id), device,
                      eval_dataset=evaluation)
    resume = args.training.resume_from
    if resume == "latest":
        found = latest_checkpoint(out)
        resume = str(found) if found else None
    if resume:
        trainer.load_checkpoint(Path(resume))
    started = time.monotonic()
    state = trainer.train()
    write_log(out, state.history)
    saved = save_final(model, processor, card, args, out)
    log.info("train_done", steps=state.global_step, seconds=round(time.monotonic() - started, 1),
             final_loss=state.history[-1]["loss"] if state.history else None)
    return TrainOutcome(state, model, processor, ModelCard.load(saved), out)


def eval_records(args: TrainArgs) -> list[Record]:
    """The fixed eval sample: at most ``eval_max_records`` of ``eval_split``, drawn once
    with ``eval_seed`` (the same records at every evaluation and on every resume)."""
    data = args.data
    records = read_manifest(Path(data.manifest), split=data.eval_split, check_images=True)
    if not records:
        raise TrainDataError(f"no records of eval split {data.eval_split!r} in {data.manifest}")
    if len(records) > data.eval_max_records:
        picked = sorted(random.Random(data.eval_seed).sample(range(len(records)),
                                                              data.eval_max_records))
        records = [records[i] for i in picked]
    return records


def save_final(model: Any, processor: Any, card: ModelCard, args: TrainArgs, out: Path) -> Path:
    """Adapter + processor + model card (with both revisions) into ``out``."""
    from inference.vlm.loading import weights_revision

    model.save_pretrained(out)
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(out)
    base_rev = args.model.base_model_revision or weights_revision(Path(args.model.model_dir))
    card.with_revisions(base_rev, weights_revision(out)).save(out)
    return out


def _args_from_cli(ns: argparse.Namespace) -> TrainArgs:
    overrides = list(getattr(ns, "set", []) or [])
    for flag, key in (("model", "model.model_dir"), ("manifest", "data.manifest"),
                      ("output", "training.output_dir"), ("resume", "training.resume_from")):
        value = getattr(ns, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(str(value))}")
    return load_train_args(getattr(ns, "args", None), overrides,
                           recipe=getattr(ns, "recipe", None))


def main(ns: argparse.Namespace) -> int:
    """``qcnode train`` handler; errors are one line on stderr, exit code 1."""
    from inference.errors import EngineError

    try:
        args = _args_from_cli(ns)
        state = run(args, process_index=_process_index()).state
    except (TrainArgsError, ManifestError, TrainDataError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    last = state.history[-1]["loss"] if state.history else math.nan
    print(f"{args.training.output_dir}: {state.global_step} step(s), last loss {last:.4f}")
    return 0


def _process_index() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


if __name__ == "__main__":  # `accelerate launch -m inference.train --args F`
    parser = argparse.ArgumentParser(prog="inference.train")
    parser.add_argument("--args", type=Path, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--recipe", default=None)
    sys.exit(main(parser.parse_args()))
