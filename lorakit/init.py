"""Registry of adapter initialisations.

An init strategy is a small pure function ``(W, r, scale) -> (A, B, W_residual)``:

* ``W`` is the frozen weight in (out, in) orientation, float32 (Conv1D and Embedding pass a transposed view);
* ``A`` is (r, in), ``B`` is (out, r);
* ``W_residual`` is what the base layer should hold afterwards. Strategies that leave the base alone
  return ``W`` itself (the same object), so nothing is copied.

New strategies (PiSSA, MiLoRA, ...) plug in with ``@register_init("name")``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["InitFn", "INIT_STRATEGIES", "register_init", "init_name", "get_init"]

InitFn = Callable[[Tensor, int, float], "tuple[Tensor, Tensor, Tensor]"]
INIT_STRATEGIES: dict[str, InitFn] = {}


def register_init(name: str) -> Callable[[InitFn], InitFn]:
    """Decorator adding an init strategy to the registry under `name`."""

    def add(fn: InitFn) -> InitFn:
        INIT_STRATEGIES[name] = fn
        return fn

    return add


def init_name(spec: bool | str) -> str:
    """Map PEFT's ``init_lora_weights`` value to a registry name (True -> "kaiming", False -> "random")."""
    if spec is True:
        return "kaiming"
    if spec is False:
        return "random"
    return str(spec)


def get_init(spec: bool | str) -> InitFn:
    return INIT_STRATEGIES[init_name(spec)]


def _kaiming_uniform(rows: int, cols: int, like: Tensor) -> Tensor:
    """What ``nn.init.kaiming_uniform_(w, a=sqrt(5))`` draws for a (rows, cols) weight: U(-1/sqrt(cols), 1/sqrt(cols))."""
    weight = torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


@register_init("kaiming")
def kaiming_init(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA's default (Hu et al. 2021, Sec. 4.1; PEFT's init): A kaiming-uniform (a=sqrt(5)), B = 0."""
    out_features, in_features = W.shape
    return _kaiming_uniform(r, in_features, W), W.new_zeros(out_features, r), W


@register_init("gaussian")
def gaussian_init(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """A ~ N(0, 1/r) as PEFT's "gaussian" (std = 1/r), B = 0."""
    out_features, in_features = W.shape
    return torch.randn(r, in_features, dtype=W.dtype, device=W.device) / r, W.new_zeros(out_features, r), W


@register_init("random")
def random_init(W: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Both factors random (``init_lora_weights=False``): the adapter is not a no-op. For tests."""
    out_features, in_features = W.shape
    return _kaiming_uniform(r, in_features, W), _kaiming_uniform(out_features, r, W), W
