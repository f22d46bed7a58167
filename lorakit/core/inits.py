"""Registry of adapter initialisations.

An init strategy is a small pure function ``(W, r, scale) -> (A, B, W_residual)``:

* ``W`` is the frozen weight in (out, in) orientation, float32 (Conv1D and Embedding pass a transposed view);
* ``A`` is (r, in), ``B`` is (out, r);
* ``W_residual`` is what the base layer should hold afterwards. Strategies that leave the base alone
  return ``W`` itself (the same object), so nothing is copied.

New strategies plug in with ``@register_init("name")``; one that rewrites the base weight (PiSSA, MiLoRA)
says so with ``moves_base=True``, which makes lorakit keep its initial factors for export, refuse it for
tied weights and with PLoRA, and run it single-threaded under a progress bar.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["INIT_STRATEGIES", "InitFn", "get_init", "init_name", "moves_base", "register_init"]

InitFn = Callable[[Tensor, int, float], "tuple[Tensor, Tensor, Tensor]"]
INIT_STRATEGIES: dict[str, InitFn] = {}
_MOVES_BASE: set[str] = set()  # names of the strategies that rewrite the base weight


def register_init(name: str, *, moves_base: bool = False) -> Callable[[InitFn], InitFn]:
    """Decorator adding an init strategy to the registry under `name`.

    Args:
        name: the value of ``init_lora_weights`` that selects it.
        moves_base: the strategy returns a residual ``W_residual`` different from ``W`` (PiSSA, MiLoRA).

    Returns:
        The decorator (it returns the function unchanged).

    Example:
        >>> @register_init("zeros_demo")
        ... def zeros(W, r, scale):
        ...     return W.new_zeros(r, W.shape[1]), W.new_zeros(W.shape[0], r), W
    """

    def add(fn: InitFn) -> InitFn:
        INIT_STRATEGIES[name] = fn
        _MOVES_BASE.discard(name)
        if moves_base:
            _MOVES_BASE.add(name)
        return fn

    return add


def moves_base(spec: bool | str) -> bool:
    """Whether the init selected by ``init_lora_weights=spec`` rewrites the base weight.

    Args:
        spec: PEFT's ``init_lora_weights`` value (a bool or a strategy name).

    Returns:
        True for strategies registered with ``moves_base=True`` (PiSSA, MiLoRA), False otherwise (also for unknown names).
    """
    return init_name(spec) in _MOVES_BASE


_PEFT_NITER = re.compile(r"pissa_niter_(\d+)")


def init_name(spec: bool | str) -> str:
    """Map PEFT's ``init_lora_weights`` value to a registry name (True -> "kaiming", False -> "random",
    "pissa_niter_K" -> "pissa_niter").

    Args:
        spec: PEFT's ``init_lora_weights`` value (a bool or a string).

    Returns:
        The registry name; any other string comes back unchanged.
    """
    if spec is True:
        return "kaiming"
    if spec is False:
        return "random"
    return "pissa_niter" if _PEFT_NITER.fullmatch(str(spec)) else str(spec)


def get_init(spec: bool | str, **options) -> InitFn:
    """The strategy for `spec` as an ``(W, r, scale)`` function, with the `options` it accepts bound.

    Args:
        spec: PEFT's ``init_lora_weights`` value: a bool, a registered name, or ``"pissa_niter_K"`` (which also
            binds ``niter=K``).
        **options: keyword options for the strategy (e.g. ``svd_solver``, ``svd_cache`` for the SVD inits);
            those it does not accept are dropped.

    Returns:
        The init function ``(W, r, scale) -> (A, B, W_residual)``.
    """
    fn = INIT_STRATEGIES[init_name(spec)]
    if match := _PEFT_NITER.fullmatch(str(spec)):
        options["niter"] = int(match.group(1))
    accepted = inspect.signature(fn).parameters
    bound = {k: v for k, v in options.items() if k in accepted}
    return functools.partial(fn, **bound) if bound else fn


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


def _svd_init(W: Tensor, r: int, scale: float, largest: bool, solver: str, cache, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA (arXiv 2404.02948, Sec. 3) / MiLoRA (arXiv 2406.09044, Sec. 3): with ``S' = S_r / s``,
    ``B = U_r diag(sqrt(S'))``, ``A = diag(sqrt(S'))V_rᵀ`` and the base keeps ``W - s·B@A``."""
    from .svd import decompose

    parts = decompose(W, r, largest, solver, niter=niter, cache=cache)
    root = (parts.S / scale).sqrt()  # (r,)
    B = (parts.U * root).to(W.dtype)  # (out, r)
    A = (root[:, None] * parts.V.T).to(W.dtype)  # (r, in)
    residual = W - scale * (B @ A)  # from the cast factors, so W_res + s·B@A == W in W's precision
    return A, B, residual


@register_init("pissa", moves_base=True)
def pissa_init(W: Tensor, r: int, scale: float, svd_solver: str = "auto", svd_cache=True) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA: the adapter starts as the r largest singular components of W."""
    return _svd_init(W, r, scale, True, svd_solver, svd_cache, niter=4)


@register_init("milora", moves_base=True)
def milora_init(W: Tensor, r: int, scale: float, svd_solver: str = "auto", svd_cache=True) -> tuple[Tensor, Tensor, Tensor]:
    """MiLoRA: the adapter starts as the r smallest singular components of W (the "minor" ones)."""
    return _svd_init(W, r, scale, False, svd_solver, svd_cache, niter=4)


@register_init("pissa_niter", moves_base=True)
def pissa_niter_init(W: Tensor, r: int, scale: float, niter: int = 4, svd_cache=True) -> tuple[Tensor, Tensor, Tensor]:
    """PEFT's ``pissa_niter_K``: PiSSA from K iterations of randomised subspace iteration (no oversampling)."""
    return _svd_init(W, r, scale, True, "peft_niter", svd_cache, niter=niter)
