"""Fully sharded data parallel training of adapter models (FSDP2: Zhao et al. 2023, "PyTorch FSDP", Sec. 3).

What decides whether a big model fits is its frozen base, not the adapter; so each process keeps 1/N of the
base's float weights (sharded per transformer block, gathered block by block in the forward and backward
passes) and a full copy of what trains: the adapter's tensors stay plain, replicated tensors whose gradients
are averaged over the processes after each backward pass, like DDP. That keeps the optimizer, checkpoints and
PEFT-format saving exactly as in one process. Quantised weights (bitsandbytes' uint8 / int8 storage, already
4-8x smaller) are replicated too: their quantisation state lives beside the packed tensor, which a shard would cut.

Sharding uses torch's ``fully_shard`` (the call accelerate's FSDP2 plugin makes); accelerate launches the
processes (any multi-process ``accelerate launch`` or ``torchrun``) and lorakit shards when
``training.fsdp: true``. It runs on CPUs (gloo) as on GPUs (NCCL).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.errors import UnsupportedModelError

__all__ = ["average_gradients", "local_share", "shard_frozen_base"]


def _block_classes(model: nn.Module) -> set[str]:
    """The class names of the model's transformer blocks (Hugging Face's ``_no_split_modules``)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def shard_frozen_base(model: nn.Module) -> int:
    """Shard the frozen float weights of `model` over the current process group, one FSDP unit per block.

    Trainable parameters and quantised weights are left out (plain tensors, replicated); average their gradients
    with `average_gradients` after each backward pass.

    Args:
        model: an adapter model (or any module) on this process's device; ``torch.distributed`` initialised.

    Returns:
        The number of blocks sharded (the root holds the rest: embeddings, final norm, head).

    Raises:
        UnsupportedModelError: the model names no transformer block class (``_no_split_modules``) to shard by.

    Example:
        Under ``torchrun --nproc_per_node=2``::

            shard_frozen_base(lora_model)
            loss = lora_model(**batch).loss
            loss.backward()
            average_gradients(p for p in lora_model.parameters() if p.requires_grad)
    """
    from torch.distributed.fsdp import fully_shard

    names = _block_classes(model)
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} names no transformer block class (Hugging Face's _no_split_modules), so lorakit "
            "cannot tell where to shard it: train it with training.fsdp: false (DDP)."
        )
    kept_whole = {p for p in model.parameters() if p.requires_grad or not p.is_floating_point()}
    for block in blocks:
        fully_shard(block, ignored_params=kept_whole & set(block.parameters()))
    fully_shard(model, ignored_params=kept_whole)
    return len(blocks)


@torch.no_grad()
def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over the processes (one all-reduce of a flat buffer).

    A parameter without a gradient on this process counts as a zero gradient, so every process sends the same
    buffer layout.

    Args:
        params: the trained parameters, in the same order on every process.
    """
    import torch.distributed as dist

    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # (total trained elements,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def local_share(model: nn.Module) -> float:
    """The fraction of the model's parameter bytes this process holds (1.0 unsharded).

    Args:
        model: a module, sharded by `shard_frozen_base` or not.

    Returns:
        Local bytes / full bytes over every parameter.
    """
    local = full = 0
    for p in model.parameters():
        size = p.element_size()
        full += p.numel() * size
        local += (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) * size
    return local / max(full, 1)
