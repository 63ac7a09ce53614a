"""The training loop of ``qcnode train``: explicit, resumable, data parallel via accelerate.

One optimizer step = ``gradient_accumulation_steps`` micro-batches (the last window of
an epoch may be shorter; its losses are averaged over its real size). Data order is a
seeded permutation per epoch, sharded over processes, so a resumed run sees exactly the
batches an uninterrupted run would have seen. A checkpoint (``checkpoint-N/``) holds the
adapter, optimizer and scheduler states, the RNG state and the loss history.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from inference.train_args import TrainingArguments

log = structlog.get_logger(__name__)

class SizedDataset(Protocol):
    """What the loop needs of a dataset: a length and examples by index."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


LOG_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "seconds", "eval_loss")
_STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, position in the epoch, loss history."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    history: list[dict[str, float]] = field(default_factory=list)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoint-N`` directory with the highest N, or None."""
    found = [p for p in output_dir.glob("checkpoint-*") if (p / _STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


class Trainer:
    """Runs the optimisation of the trainable (LoRA) parameters of ``model``."""

    def __init__(
        self, model: Any, dataset: SizedDataset, args: TrainingArguments,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]], device: str,
        eval_dataset: SizedDataset | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=device == "cpu")
        self.args = args
        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.collate = collate
        self.device = device
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (no LoRA target matched)")
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                      weight_decay=args.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.params = params
        self.total_steps = self._total_steps()
        warmup = math.ceil(args.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(args.lr_scheduler, warmup, self.total_steps)
        )
        self.state = TrainState()
        self.output_dir = Path(args.output_dir)

    # Data -------------------------------------------------------------------------
    def _shard(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.args.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        acc = self.accelerator
        return [int(i) for i in order[acc.process_index :: acc.num_processes]]

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        shard, bs = self._shard(epoch), self.args.per_device_train_batch_size
        return [shard[i : i + bs] for i in range(0, len(shard), bs)]

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = math.ceil(len(self._micro_batches(0)) / self.args.gradient_accumulation_steps)
        return max(1, math.ceil(per_epoch * self.args.num_train_epochs))

    def _batch(self, indices: list[int], dataset: SizedDataset | None = None
               ) -> dict[str, torch.Tensor]:
        source = self.dataset if dataset is None else dataset
        batch = self.collate([source[i] for i in indices])
        dtype = next(p for p in self.params).dtype if self.device == "cpu" else torch.bfloat16
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # Loop -------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Run until ``total_steps`` optimizer steps; returns the state."""
        self.model.train()
        started = time.monotonic()
        while self.state.global_step < self.total_steps:
            micro = self._micro_batches(self.state.epoch)
            accum = self.args.gradient_accumulation_steps
            pos = self.state.micro_in_epoch
            while pos < len(micro) and self.state.global_step < self.total_steps:
                window = micro[pos : pos + accum]
                loss = self._step(window)
                pos += len(window)
                self.state.micro_in_epoch = pos
                self._after_step(loss, pos / len(micro), started)
            if pos >= len(micro):
                self.state.epoch += 1
                self.state.micro_in_epoch = 0
        history = self.state.history
        if self.eval_dataset is not None and history and "eval_loss" not in history[-1]:
            history[-1]["eval_loss"] = self.eval_loss()
        return self.state

    def eval_loss(self) -> float:
        """Mean loss (answer tokens) over the eval dataset, without gradients.

        Each example's loss is weighted by its batch's size, so the value does not depend
        on how the fixed eval sample falls into batches.
        """
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            raise ValueError("no eval dataset")
        bs = self.args.per_device_train_batch_size
        total, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(self.eval_dataset), bs):
                indices = list(range(start, min(start + bs, len(self.eval_dataset))))
                out = self.model(**self._batch(indices, self.eval_dataset))
                total += float(out.loss) * len(indices)
                count += len(indices)
        self.model.train()
        loss = total / count
        log.info("train_eval", step=self.state.global_step, eval_loss=round(loss, 6),
                 records=count)
        return loss

    def _step(self, window: list[list[int]]) -> float:
        total = 0.0
        for indices in window:
            out = self.model(**self._batch(indices))
            loss = out.loss / len(window)
            self.accelerator.backward(loss)
            total += float(loss.detach())
        norm = self.accelerator.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self._last_norm = float(norm) if norm is not None else math.nan
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _after_step(self, loss: float, epoch_fraction: float, started: float) -> None:
        s = self.state
        s.global_step += 1
        row = {
            "step": float(s.global_step), "epoch": s.epoch + epoch_fraction, "loss": loss,
            "learning_rate": float(self.scheduler.get_last_lr()[0]),
            "grad_norm": self._last_norm, "seconds": time.monotonic() - started,
        }
        every = self.args.eval_steps
        if self.eval_dataset is not None and every > 0 and s.global_step % every == 0:
            row["eval_loss"] = self.eval_loss()
        s.history.append(row)
        if s.global_step % max(1, self.args.logging_steps) == 0:
            log.info("train_step", **{k: round(v, 6) for k, v in row.items()})
        if self.args.save_steps > 0 and s.global_step % self.args.save_steps == 0:
            self.save_checkpoint()

    # Checkpoints ------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-N`` (main process only) and prune old ones."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        path = self.output_dir / f"checkpoint-{self.state.global_step}"
        acc.unwrap_model(self.model).save_pretrained(path)
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), path / "scheduler.pt")
        torch.save(torch.get_rng_state(), path / "rng.pt")
        state = {"global_step": self.state.global_step, "epoch": self.state.epoch,
                 "micro_in_epoch": self.state.micro_in_epoch, "history": self.state.history}
        (path / _STATE_FILE).write_text(json.dumps(state) + "\n")
        write_log(self.output_dir, self.state.history)
        self._prune()
        return path

    def _prune(self) -> None:
        keep = self.args.save_total_limit
        if keep <= 0:
            return
        found = sorted(self.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        for old in found[:-keep]:
            shutil.rmtree(old)

    def load_checkpoint(self, path: Path) -> None:
        """Restore adapter weights, optimizer, scheduler, RNG and position from ``path``."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not (path / _STATE_FILE).is_file():
            raise ValueError(f"{path} is not a qcnode training checkpoint")
        weights = load_file(str(path / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.accelerator.unwrap_model(self.model), weights)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        data = json.loads((path / _STATE_FILE).read_text())
        self.state = TrainState(data["global_step"], data["epoch"], data["micro_in_epoch"],
                                data["history"])
        log.info("train_resumed", checkpoint=path.name, step=self.state.global_step)


def write_log(output_dir: Path, history: list[dict[str, float]]) -> None:
    """``training_log.csv`` and ``loss.png`` (matplotlib, Agg) from the loss history."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "training_log.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], marker=".",
            label="train")
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o",
                label="eval")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("qcnode train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / "loss.png")
    plt.close(fig)
