"""The training loop: AdamW, warm-up + linear/cosine decay, gradient accumulation and clipping, seeded
data order, periodic evaluation, atomic checkpoints and exact resume, on one or N processes (accelerate).

Exact resume: the data order is a pure function of (seed, epoch), a checkpoint holds the adapter,
optimizer, scheduler, RNG state and step, so a run killed at any point and resumed from its last
checkpoint ends with the same adapter as an uninterrupted run.

Multi-process: every process sees the same global batch order and takes its own slice; the loss is
summed over the process's completion tokens and divided by the global batch's token count (times the
world size, since DDP averages gradients), so N processes compute the same update as one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import IGNORE_INDEX, collate, collate_classification, completion_logprobs
from .errors import LoraConfigError, ResumeError, TrainingDivergedError, TrainingOutputError
from .io import adapter_parameters, read_adapter
from .model import LoraModel
from .plora import STAGES_DIR, stage_lr_lambda

__all__ = ["TrainingConfig", "Trainer", "CompletionObjective", "ClassificationObjective", "TrainingDivergedError", "latest_checkpoint"]

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainingConfig:
    """How to train. Sizes are global (all processes together)."""

    output_dir: str = "runs/lorakit"
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    max_length: int = 256
    eval_batch_size: int = 16
    resume: bool = False
    method: str = "lora"  # "lora" | "plora" (periodic unloading, see the plora section)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "plora"):
            raise ValueError(f"method={self.method!r}: use 'lora' or 'plora'.")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule={self.schedule!r}: use 'cosine', 'linear' or 'constant'.")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1.")


def lr_lambda(config: TrainingConfig, steps: int | None = None) -> Callable[[int], float]:
    """Linear warm-up, then cosine or linear decay to 0 over `steps` (default: the run's), or constant."""
    steps = config.steps if steps is None else steps

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else max(0.0, 1 - progress)

    return factor


def batch_indices(n_items: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Items of global batch `step`: consecutive slices of a per-epoch seeded permutation."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_items} training items are fewer than one batch of {batch_size}.")
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n_items))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order[offset * batch_size : (offset + 1) * batch_size]


class CompletionObjective:
    """Causal LM: summed cross-entropy over completion tokens; the unit of normalisation is a token."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def units(self, item: dict) -> int:
        return sum(label != IGNORE_INDEX for label in item["labels"])

    def loss_sum(self, model, items: list[dict], device) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(device) for k, v in collate(items, self.pad_id).items()}
        logprobs, _ = completion_logprobs(model, batch)
        return -logprobs.sum(), int(batch["attention_mask"].sum())


class ClassificationObjective:
    """Sequence classification: summed cross-entropy over items ({input_ids, label}); the unit is an item."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def units(self, item: dict) -> int:
        return 1

    def loss_sum(self, model, items: list[dict], device) -> tuple[torch.Tensor, int]:
        batch = {k: v.to(device) for k, v in collate_classification(items, self.pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits  # (batch, classes)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), int(batch["attention_mask"].sum())


def check_output_dir(config: "TrainingConfig") -> None:
    """A fresh run must not mix its checkpoints and metrics with an earlier run's."""
    output = Path(config.output_dir)
    earlier = latest_checkpoint(output) or (output / "metrics.jsonl").exists() or any(output.glob(f"{STAGES_DIR}/stage-*"))
    if not config.resume and earlier:
        raise TrainingOutputError(
            f"{output} holds an earlier run (checkpoints, metrics.jsonl or PLoRA stages): pass --resume (training.resume=true) "
            "to continue it, or set training.output_dir to a new folder."
        )


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (complete = renamed into place, so it holds every file)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    done = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return done[-1] if done else None


class Trainer:
    """Trains the trainable parameters of `model` (a LoraModel's active adapter, or any module's
    parameters with requires_grad) on tokenized items.

    `objective` defaults to `CompletionObjective(pad_id)` (items {input_ids, labels});
    `ClassificationObjective` takes items {input_ids, label}."""

    def __init__(self, model: torch.nn.Module, items: Sequence[dict], config: TrainingConfig, pad_id: int,
                 evaluate: Callable[[], dict] | None = None, objective=None, plora=None) -> None:
        from accelerate import Accelerator

        self.config, self.items, self.evaluate = config, list(items), evaluate
        self.objective = objective or CompletionObjective(pad_id)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes
        micro = config.batch_size // (self.world * config.grad_accum)
        if micro * self.world * config.grad_accum != config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum = {self.world * config.grad_accum}.")
        self.micro_batch = micro
        torch.manual_seed(config.seed)
        self.module = model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Not prepared: accelerate's scheduler wrapper steps once per process, which would run the
        # schedule N times too fast; one optimizer step here is one global batch.
        self.plora = plora  # a PeriodicLoRA: unloads the adapter into the base at each stage end
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor())
        self.step = 0
        self.output = Path(config.output_dir)
        self.is_main = self.accelerator.is_main_process
        if config.resume:
            self._resume()
        else:
            check_output_dir(config)

    def _lr_factor(self) -> Callable[[int], float]:
        if self.plora is None:
            return lr_lambda(self.config)
        stage_steps = self.plora.config.stage_steps(self.config.batch_size)  # also checks stages end on a step
        if self.plora.config.lr_schedule == "global":
            return lr_lambda(self.config)
        return stage_lr_lambda(lr_lambda(self.config, stage_steps), stage_steps)

    # -- batches ----------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> tuple[list[list[dict]], int]:
        """This process's micro-batches for `step` and the global batch's completion-token count."""
        indices = batch_indices(len(self.items), self.config.seed, step, self.config.batch_size)
        batch = [self.items[i] for i in indices]
        tokens = sum(self.objective.units(item) for item in batch)
        chunks = [batch[i : i + self.micro_batch] for i in range(0, len(batch), self.micro_batch)]
        rank = self.accelerator.process_index
        mine = [chunk for i, chunk in enumerate(chunks) if i % self.world == rank]  # accumulation-major
        return mine, tokens

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics."""
        started = time.perf_counter()
        chunks, tokens = self._micro_batches(self.step)
        total, seen = 0.0, 0
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            context = self.accelerator.no_sync(self.model) if not last else contextlib.nullcontext()
            with context:
                loss_sum, n_tokens = self.objective.loss_sum(self.model, chunk, self.accelerator.device)
                self.accelerator.backward(loss_sum * self.world / tokens)
            total += loss_sum.item()
            seen += n_tokens
        loss = self._global_mean(total, tokens)
        if not math.isfinite(loss):
            last = latest_checkpoint(self.output)
            raise TrainingDivergedError(
                f"the loss became {loss} at step {self.step + 1}; stopped without saving. The last good checkpoint "
                f"is {last or 'none'}. Lower training.lr or raise training.warmup_steps, then resume."
            )
        if self.config.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {"step": self.step, "loss": loss, "lr": lr}
        if self.plora is not None and self.plora.step(self.optimizer, samples=self.config.batch_size):
            metrics["unloaded"] = len(self.plora.stages)
        return metrics | {"tokens_per_s": seen * self.world / (time.perf_counter() - started)}

    def _global_mean(self, local_sum: float, tokens: int) -> float:
        if self.world == 1:
            return local_sum / tokens
        summed = self.accelerator.reduce(torch.tensor([local_sum], device=self.accelerator.device), reduction="sum")
        return summed.item() / tokens

    # -- loop -------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to `config.steps`, evaluating and checkpointing on schedule; metrics go to metrics.jsonl."""
        history = []
        self.model.train()  # HF models load in eval mode; dropout belongs to training
        bar = tqdm(total=self.config.steps, initial=self.step, desc="training", disable=not self.is_main)
        while self.step < self.config.steps:
            metrics = self.train_step()
            if self.evaluate and self.config.eval_every and self.step % self.config.eval_every == 0:
                metrics |= {f"eval_{k}": v for k, v in self.evaluate().items()}
            history.append(metrics)
            self._log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if self.config.save_every and (self.step % self.config.save_every == 0 or self.step == self.config.steps):
                self.save_checkpoint()
        bar.close()
        return history

    def _log(self, metrics: dict) -> None:
        if self.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            with open(self.output / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(metrics) + "\n")

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Adapter + optimizer + scheduler + RNG + step, written to a temp dir and renamed into place."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        folder = self.output / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        target = folder / f"step-{self.step:06d}"
        try:
            self._save_trainable(staging)
            state = {
                "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            }
            if self.plora is not None:
                state["plora"] = self.plora.state_dict()
            torch.save(state, staging / STATE_FILE)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.output)
        if checkpoint is None:
            return
        live = self._trainable_live()
        with torch.no_grad():
            for key, value in self._trainable_tensors(checkpoint).items():
                live[key].copy_(value)
        state = torch.load(checkpoint / STATE_FILE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.plora is not None:
            self.plora.load_state_dict(state["plora"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = state["step"]
        self._truncate_metrics()

    def _trainable_live(self) -> dict[str, torch.Tensor]:
        """Saved name -> live tensor of what this run trains."""
        if isinstance(self.module, LoraModel):
            return dict(adapter_parameters(self.module, self.module.active_adapters[0]))
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def _save_trainable(self, folder: Path) -> None:
        """A LoraModel's adapter in PEFT format; for other models the trained tensors as safetensors."""
        if isinstance(self.module, LoraModel):
            self.module.save_pretrained(folder / "adapter", adapter_name=self.module.active_adapters[0])
        else:
            save_file({k: v.detach().contiguous() for k, v in self._trainable_live().items()}, folder / TRAINABLE_FILE)

    def _trainable_tensors(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        if isinstance(self.module, LoraModel):
            return read_adapter(checkpoint / "adapter").tensors
        return load_file(checkpoint / TRAINABLE_FILE)

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
        path = self.output / "metrics.jsonl"
        if self.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(line + "\n" for line in kept))
