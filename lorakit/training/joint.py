"""Training several LoRA adapters at once: one forward over the rows of every adapter's batch, each row through
its own adapter (the mixed-batch routing of `LoraModel`, with gradients).

Each adapter gets exactly the update it would get trained alone by `Trainer` with the same settings: its rows
are the batch `batch_indices` picks for it (same seed, same order), its loss is divided by its own batch's
completion tokens, its gradients are clipped on their own, and AdamW and the schedule act on each parameter
separately. The adapters' parameters are disjoint and the base is frozen, so summing the per-adapter losses
into one backward changes nothing but the speed (tested against separate runs to float tolerance; with
``lora_dropout > 0`` the dropout masks are drawn differently, so runs agree in distribution only).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from ..core.errors import LoraConfigError, TrainingDivergedError
from ..core.examples import collate, completion_logprobs
from ..core.lora_model import LoraModel
from .data_order import batch_indices
from .objectives import CompletionObjective
from .settings import TrainingConfig
from .trainer import lr_lambda

__all__ = ["train_together"]

_UNSUPPORTED = {"packing": False, "group_by_length": False, "fsdp": False, "resume": False, "early_stopping_patience": 0,
                "precision": "fp32", "gradient_checkpointing": False}


def _check(model: LoraModel, items: Mapping[str, Sequence[dict]], config: TrainingConfig) -> None:
    if not isinstance(model, LoraModel):
        raise LoraConfigError("train_together trains adapters of a LoraModel: wrap the model with lorakit.get_lora_model first.")
    unknown = [name for name in items if name not in model.peft_config]
    if not items or unknown:
        raise LoraConfigError(f"train_together needs items for adapters of the model; {unknown[0] if unknown else 'none'} is "
                              f"not one (the model has {sorted(model.peft_config)}).")
    changed = [f"training.{key}" for key, plain in _UNSUPPORTED.items() if getattr(config, key) != plain]
    if changed:
        raise LoraConfigError(f"train_together runs the plain loop: {', '.join(changed)} work one adapter at a time "
                              "(lorakit train); reset them to train adapters together.")
    for rows in items.values():
        batch_indices(len(rows), config.seed, 0, config.batch_size)  # at least one batch each (DataError names the size)


def train_together(model: LoraModel, items: Mapping[str, Sequence[dict]], config: TrainingConfig, pad_id: int,
                   progress: bool = True) -> list[dict]:
    """Train the adapters named in `items` together, each on its own tokenized completions.

    Every optimizer step takes, for each adapter, the global batch a `Trainer` of that adapter alone would take at
    that step, runs all those rows in one forward (``grad_accum`` micro-batches of them), and updates every adapter.

    Args:
        model: a `LoraModel` holding the adapters (its base frozen).
        items: adapter name -> its tokenized items (``input_ids``, ``labels``), as for `Trainer`.
        config: the training settings every adapter shares (``steps``, ``batch_size``, ``grad_accum``, ``lr``,
            ``schedule``, ``warmup_steps``, ``max_grad_norm``, ``weight_decay``, ``seed``); packing, length grouping,
            FSDP, resume, early stopping and half precision are for one-adapter runs.
        pad_id: the tokenizer's padding id.
        progress: show a progress bar.

    Returns:
        One metrics dict per step: ``{"step", "loss": {adapter: loss}, "grad_norm": {adapter: norm}, "lr",
        "tokens_per_s"}``.

    Raises:
        LoraConfigError: not a `LoraModel`, an adapter it does not hold, or an unsupported setting.
        DataError: an adapter has fewer items than one batch.
        TrainingDivergedError: a loss or gradient norm became NaN or infinite.

    Example:
        >>> from lorakit.training.joint import train_together  # doctest: +SKIP
        >>> history = train_together(model, {"navigate": navigate_items, "snarks": snarks_items}, config, pad_id)  # doctest: +SKIP
    """
    _check(model, items, config)
    names = list(items)
    torch.manual_seed(config.seed)
    params = {name: list(model.training_state(name).values()) for name in names}
    for tensors in params.values():
        for tensor in tensors:
            tensor.requires_grad_(True)
    everything = [p for name in names for p in params[name]]
    optimizer = torch.optim.AdamW(everything, lr=config.lr, weight_decay=config.weight_decay)  # elementwise: per adapter
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    objective, device = CompletionObjective(pad_id), next(model.parameters()).device
    micro = config.batch_size // config.grad_accum
    model.train()
    history = []
    for step in tqdm(range(config.steps), desc=f"training {len(names)} adapters together", disable=not progress):
        started = time.perf_counter()
        batches = {name: [items[name][i] for i in batch_indices(len(items[name]), config.seed, step, config.batch_size)] for name in names}
        units = {name: sum(objective.units(item) for item in batch) for name, batch in batches.items()}
        losses, seen = dict.fromkeys(names, 0.0), 0
        for start in range(0, config.batch_size, micro):
            rows = [(name, item) for name in names for item in batches[name][start : start + micro]]
            batch = {k: v.to(device) for k, v in collate([item for _, item in rows], pad_id).items()}
            row_names = [name for name, _ in rows]
            logprobs, _ = completion_logprobs(functools.partial(model, adapter_names=row_names), batch)  # (rows, k)
            row_losses = -logprobs.sum(-1)  # (rows,)
            weights = torch.tensor([1 / units[name] for name in row_names], device=device)  # each adapter's own mean
            (row_losses * weights).sum().backward()
            for name, loss in zip(row_names, row_losses.tolist()):
                losses[name] += loss / units[name]
            seen += int(batch["attention_mask"].sum())
        norms = {name: float(torch.nn.utils.clip_grad_norm_(params[name], config.max_grad_norm or math.inf)) for name in names}
        bad = [name for name in names if not (math.isfinite(losses[name]) and math.isfinite(norms[name]))]
        if bad:
            raise TrainingDivergedError(f"adapter {bad[0]!r}: loss {losses[bad[0]]}, gradient norm {norms[bad[0]]} at step "
                                        f"{step + 1}; lower training.lr or raise training.warmup_steps.")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": losses, "grad_norm": norms, "lr": lr,
                        "tokens_per_s": seen / (time.perf_counter() - started)})
    return history
