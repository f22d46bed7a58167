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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core.adapter_model import AdapterModel
from ..core.atomic import atomic_write_text, staged_directory
from ..core.errors import (
    LoraConfigError,
    ResumeError,
    TrainingDivergedError,
    TrainingOutputError,
)
from ..core.lora_model import LoraModel
from ..core.peft_format import read_adapter
from ..core.run_layout import RunLayout
from ..methods.plora.periodic import stage_lr_lambda
from .data_order import batch_indices, epoch_order
from .early_stopping import early_stopping_for
from .objectives import ClassificationObjective, CompletionObjective, TrainingObjective
from .precision import Precision, enable_activation_checkpointing
from .settings import TrainingConfig
from .sharding import average_gradients, local_share, shard_frozen_base

__all__ = [
    "ClassificationObjective",
    "CompletionObjective",
    "Trainer",
    "TrainingConfig",
    "TrainingDivergedError",
    "TrainingObjective",
    "batch_indices",
    "epoch_order",
    "latest_checkpoint",
]



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


def check_output_dir(config: TrainingConfig) -> None:
    """A fresh run must not mix its checkpoints and metrics with an earlier run's."""
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise TrainingOutputError(f"training.output_dir={str(output)!r} is a file: name a folder for the run.")
    if not config.resume and RunLayout(output).holds_earlier_run():
        raise TrainingOutputError(
            f"{output} holds an earlier run (checkpoints, metrics.jsonl or PLoRA stages): pass --resume (training.resume=true) "
            "to continue it, or set training.output_dir to a new folder."
        )


def _differences(recorded, current, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, recorded value, current value) for every leaf that differs."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            found += _differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if recorded == current else [(prefix.rstrip("."), recorded, current)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (complete = renamed into place, so it holds every file).

    Args:
        output_dir: the run directory.

    Returns:
        Its newest ``checkpoints/step-NNNNNN`` folder, or None when there is none.
    """
    return RunLayout(output_dir).latest_checkpoint()


class Trainer:
    """Trains the trainable parameters of `model` (a LoraModel's active adapter, or any module's
    parameters with requires_grad) on tokenized items.

    `objective` defaults to `CompletionObjective(pad_id)` (items {input_ids, labels});
    `ClassificationObjective` takes items {input_ids, label}. `on_eval(step, evaluation)`, when given, is called
    after each scheduled validation, once its metrics are logged; an exception it raises (a sweep's pruner)
    ends the run there."""

    def __init__(self, model: torch.nn.Module, items: Sequence[dict], config: TrainingConfig, pad_id: int,
                 evaluate: Callable[[], dict] | None = None, objective: TrainingObjective | None = None, plora=None,
                 settings: dict | None = None, on_eval: Callable[[int, dict], None] | None = None) -> None:
        from accelerate import Accelerator

        self.items = items if isinstance(items, Sequence) else list(items)  # a lazy sequence stays lazy (data > memory)
        self.config, self.evaluate, self.on_eval = config, evaluate, on_eval
        batch_indices(len(self.items), config.seed, 0, config.batch_size)  # enough data for one batch
        self.lengths = [len(item["input_ids"]) for item in self.items] if config.group_by_length else None
        self._epoch: tuple[int, list[int]] = (-1, [])
        self.settings = self._run_settings(model, settings or {})
        self.objective = objective or CompletionObjective(pad_id)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world = self.accelerator.num_processes
        micro = config.batch_size // (self.world * config.grad_accum)
        if micro * self.world * config.grad_accum != config.batch_size:
            raise LoraConfigError(f"batch_size={config.batch_size} must be divisible by processes x grad_accum = {self.world * config.grad_accum}.")
        self.micro_batch = micro
        torch.manual_seed(config.seed)
        self.module = model
        self.precision = Precision(config.precision, self.accelerator.device)
        self.precision.prepare(model)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.sharded = self._check_sharding(model, plora) and self.world > 1
        if self.sharded:  # before the optimizer, which then holds the sharded model's (unchanged) trained tensors
            model.to(self.accelerator.device)  # fully_shard moves only what it shards
            shard_frozen_base(model)
        self.weights_share = local_share(model)  # of the model's parameter bytes, on this process
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = (model, optimizer) if self.sharded else self.accelerator.prepare(model, optimizer)
        # Not prepared: accelerate's scheduler wrapper steps once per process, which would run the
        # schedule N times too fast; one optimizer step here is one global batch.
        self.plora = plora  # a PeriodicLoRA: unloads the adapter into the base at each stage end
        self.early_stopping = early_stopping_for(config, evaluate is not None, plora is not None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor())
        self.step = 0
        self.layout = RunLayout(config.output_dir)
        self.is_main = self.accelerator.is_main_process
        if config.resume:
            self._resume()
        else:
            check_output_dir(config)

    def _check_sharding(self, model: torch.nn.Module, plora) -> bool:
        """Whether this run shards its base (``training.fsdp``), refusing what sharding cannot carry."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise LoraConfigError(
                "accelerate's own FSDP mode would shard the adapter too; launch with a multi-process (MULTI_GPU or "
                "MULTI_CPU) accelerate config and set training.fsdp: true, which shards the frozen base only."
            )
        if not self.config.fsdp:
            return False
        if plora is not None:
            raise LoraConfigError("PLoRA unloads the adapter into the base weights, which training.fsdp shards over the "
                                  "processes: train PLoRA with training.fsdp: false (DDP).")
        if isinstance(model, LoraModel) and any(layer.initial_factors for _, layer in model.lora_layers()):
            raise LoraConfigError("PiSSA/MiLoRA's plain-LoRA export reads the whole residual base weight, which "
                                  "training.fsdp shards over the processes: train them with training.fsdp: false (DDP).")
        return True

    def _run_settings(self, model: torch.nn.Module, extra: dict) -> dict:
        """What must not change when this run is resumed: the training maths, the adapter's config, the
        data (a hash of the tokenised items) and whatever the caller adds (e.g. the model)."""
        import xxhash

        settings = {"training": self.config.math_settings(), **extra}
        if isinstance(model, AdapterModel) and model.active_adapters:
            settings["adapter"] = model.peft_config[model.active_adapters[0]].to_peft_dict()
        as_json = lambda value: value.tolist() if hasattr(value, "tolist") else str(value)  # noqa: E731
        digest = xxhash.xxh3_128()  # of json.dumps(items), written item by item: the items are never all in memory
        digest.update(b"[")
        for index, item in enumerate(self.items):
            digest.update((", " if index else "").encode() + json.dumps(item, sort_keys=True, default=as_json).encode())
        digest.update(b"]")
        settings["data"] = digest.hexdigest()
        return json.loads(json.dumps(settings, default=str))

    def _lr_factor(self) -> Callable[[int], float]:
        if self.plora is None:
            return lr_lambda(self.config)
        stage_steps = self.plora.config.stage_steps(self.config.batch_size)  # also checks stages end on a step
        if self.plora.config.lr_schedule == "global":
            return lr_lambda(self.config)
        return stage_lr_lambda(lr_lambda(self.config, stage_steps), stage_steps)

    # -- batches ----------------------------------------------------------------------------------
    def global_batch(self, step: int) -> list[dict]:
        """The items of global batch `step` (all processes'), as `batch_indices` picks them.

        Args:
            step: the optimizer step (0-based).

        Returns:
            The batch's tokenized items, in order.
        """
        per_epoch = len(self.items) // self.config.batch_size
        epoch, offset = divmod(step, per_epoch)
        if self._epoch[0] != epoch:  # each epoch's order computed once (grouping by length sorts the epoch)
            self._epoch = (epoch, epoch_order(len(self.items), self.config.seed, epoch, self.config.batch_size, self.lengths))
        return [self.items[i] for i in self._epoch[1][offset * self.config.batch_size : (offset + 1) * self.config.batch_size]]

    def _micro_batches(self, step: int) -> tuple[list[list[dict]], int]:
        """This process's micro-batches for `step` and the global batch's completion-token count."""
        batch = self.global_batch(step)
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
                with self.precision.autocast():
                    loss_sum, n_tokens = self.objective.loss_sum(self.model, chunk, self.accelerator.device)
                self.accelerator.backward(self.precision.scale(loss_sum * self.world / tokens))
            total += loss_sum.item()
            seen += n_tokens
        if self.sharded:  # the trained tensors are replicated: average their gradients as DDP would
            average_gradients(self.params)
        loss = self._global_mean(total, tokens)
        if not math.isfinite(loss):
            last = self.layout.latest_checkpoint()
            raise TrainingDivergedError(
                f"the loss became {loss} at step {self.step + 1}; stopped without saving. The last good checkpoint "
                f"is {last or 'none'}. Lower training.lr or raise training.warmup_steps, then resume."
            )
        self.precision.unscale(self.optimizer)
        grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf))
        overflow = not math.isfinite(grad_norm) and self.precision.scaler is not None  # fp16: the scaler skips it
        if not math.isfinite(grad_norm) and not overflow:
            self.optimizer.zero_grad(set_to_none=True)  # never applied, never saved
            last = self.layout.latest_checkpoint()
            raise TrainingDivergedError(
                f"the gradient norm became {grad_norm} at step {self.step + 1} (loss {loss:.4g}); the step was not applied "
                f"and nothing was saved. The last good checkpoint is {last or 'none'}. Lower training.lr, raise "
                "training.warmup_steps or use float32, then resume."
            )
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.precision.step(self.optimizer)  # with fp16's scaler: skipped when the gradients overflowed
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm} | ({"overflow": True} if overflow else {})
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
        stopping = self.early_stopping
        while self.step < self.config.steps and not (stopping and stopping.stopped):
            metrics, evaluation = self.train_step(), None
            if self.evaluate and self.config.eval_every and self.step % self.config.eval_every == 0:
                with self.precision.autocast():
                    evaluation = self.evaluate()
                metrics |= {f"eval_{k}": v for k, v in evaluation.items()}
                if stopping and stopping.update(self.step, evaluation["loss"], self._trainable_live()):
                    metrics |= {"early_stop": True, "best_step": stopping.best_step}
            history.append(metrics)
            self._log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if evaluation is not None and self.on_eval is not None:  # e.g. a sweep's pruner, which may stop the run by raising
                self.on_eval(self.step, evaluation)
            finished = self.step == self.config.steps or (stopping and stopping.stopped)
            if self.config.save_every and (self.step % self.config.save_every == 0 or finished):
                self.save_checkpoint()
        bar.close()
        if stopping:  # the best evaluation's adapter is the run's
            stopping.restore(self._trainable_live())
        return history

    def finish(self) -> None:
        """End the collective part: every process waits here, then the process group closes.

        What follows (the final evaluation, the exports) runs on the main process alone; a process that left
        with the group still open would abort at interpreter exit while the main one is still working. The DDP
        wrapper goes first, while every process is here: its reducer holds the group, and a group destroyed later,
        when the reducer is collected after another process has left, can wait forever for its worker threads.
        """
        self.accelerator.wait_for_everyone()
        self.model = self.module
        self.accelerator.free_memory()  # accelerate's references to the prepared (DDP) model and optimizer, then gc
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def _log(self, metrics: dict) -> None:
        if self.is_main:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            with open(self.layout.metrics, "a") as stream:
                stream.write(json.dumps(metrics) + "\n")

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Adapter + optimizer + scheduler + RNG + step + the run's settings, as one folder swapped into place."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        damaged = [key for key, value in self._trainable_live().items() if not torch.isfinite(value).all()]
        if damaged:
            raise TrainingDivergedError(
                f"{damaged[0]} holds NaN or infinite values at step {self.step}; not saved. The last good checkpoint is "
                f"{self.layout.latest_checkpoint() or 'none'}. Lower training.lr, then resume."
            )
        target = self.layout.checkpoint(self.step)
        with staged_directory(target) as staging:
            self._save_trainable(staging)
            state = {
                "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "settings": json.dumps(self.settings),
                "scaler": self.precision.state_dict(),
            }
            if self.plora is not None:
                state["plora"] = self.plora.state_dict()
            if self.early_stopping is not None:
                state["early_stopping"] = self.early_stopping.state_dict()
                save_file(self.early_stopping.best_tensors, staging / RunLayout.BEST_FILE)
            torch.save(state, staging / RunLayout.STATE_FILE)
        return target

    def _resume(self) -> None:
        checkpoint = self.layout.latest_checkpoint()
        if checkpoint is None:
            if self.is_main:
                print(f"lorakit: no checkpoint in {self.layout.checkpoints}: --resume starts the run from step 0.", file=sys.stderr)
            if self.plora is not None:
                self.plora.load_state_dict({"stages": 0, "samples": 0, "steps": 0, "unload_seconds": 0.0})
            self._truncate_metrics()
            return
        state = self._read_state(checkpoint)
        self._check_same_run(checkpoint, state)
        trainable = self._trainable_tensors(checkpoint)
        live = self._trainable_live()
        if set(trainable) != set(live) or any(trainable[k].shape != live[k].shape for k in live):
            raise ResumeError(f"{checkpoint} holds other trained tensors than this run trains; it belongs to another run.")
        with torch.no_grad():
            for key, value in trainable.items():
                live[key].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler", {}))
        if self.plora is not None:
            self.plora.load_state_dict(state["plora"])
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(state["early_stopping"], load_file(checkpoint / RunLayout.BEST_FILE))
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step = state["step"]
        self._truncate_metrics()

    @staticmethod
    def _read_state(checkpoint: Path) -> dict:
        try:
            state = torch.load(checkpoint / RunLayout.STATE_FILE, weights_only=True)
        except Exception as err:  # torch raises many types for damaged files
            raise ResumeError(
                f"{checkpoint / RunLayout.STATE_FILE} could not be read ({type(err).__name__}); delete {checkpoint} to resume from the "
                "checkpoint before it."
            ) from None
        needed = {"step", "optimizer", "scheduler", "torch_rng", "python_rng"}
        if not isinstance(state, dict) or not needed <= set(state):
            raise ResumeError(f"{checkpoint / RunLayout.STATE_FILE} is not a lorakit trainer state; delete {checkpoint} to resume from an earlier one.")
        return state

    def _check_same_run(self, checkpoint: Path, state: dict) -> None:
        """Refuse to resume with other settings or data than the checkpoint's run, listing the differences."""
        if "settings" not in state:
            return  # a checkpoint from before settings were recorded
        recorded = json.loads(state["settings"])
        differences = _differences(recorded, self.settings)
        if differences:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:8])
            raise ResumeError(
                f"--resume would continue {checkpoint} with other settings ({listed}). Resume with the run's own settings, "
                "or start a new run in another training.output_dir."
            )

    def _trainable_live(self) -> dict[str, torch.Tensor]:
        """Name -> live tensor of everything this run trains (an adapter model's `training_state`)."""
        if isinstance(self.module, AdapterModel):
            return self.module.training_state(self.module.active_adapters[0])
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def _save_trainable(self, folder: Path) -> None:
        """The trained tensors as safetensors, and an adapter model's adapter in PEFT format beside them."""
        save_file({k: v.detach().contiguous() for k, v in self._trainable_live().items()}, folder / RunLayout.TRAINABLE_FILE)
        if isinstance(self.module, AdapterModel):
            self.module.save_pretrained(RunLayout(folder).adapter, adapter_name=self.module.active_adapters[0])

    def _trainable_tensors(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        try:
            if not (checkpoint / RunLayout.TRAINABLE_FILE).is_file() and isinstance(self.module, AdapterModel):
                return read_adapter(RunLayout(checkpoint).adapter, self.module.config_types).tensors  # checkpoints of lorakit < 0.3
            return load_file(checkpoint / RunLayout.TRAINABLE_FILE)
        except Exception as err:
            raise ResumeError(f"{checkpoint} is damaged ({err}); delete it to resume from the checkpoint before it.") from None

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
        path = self.layout.metrics
        if self.is_main and path.is_file():
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue  # a line cut short by a kill
            atomic_write_text(path, "".join(line + "\n" for line in kept))
