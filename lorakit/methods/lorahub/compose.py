"""LoraHub's composition (arXiv 2307.13269, Sec. 3.1): modules are LoRA adapters that share targets, rank
and alpha; the composed module is, per layer, ``A = Σ_i w_i·A_i`` and ``B = Σ_i w_i·B_i`` (so
``B@A = Σ_i Σ_j w_i w_j B_i@A_j``: cross terms included, unlike PEFT's ``add_weighted_adapter``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.config import LoraConfig
from ...core.errors import LoraConfigError
from ...core.inits import moves_base
from ...core.loading import adapter_state_dict
from ...core.lora_model import LoraModel
from ...core.peft_format import read_adapter, write_adapter
from ...core.validation import is_finite_number
from .library import expand_libraries

__all__ = ["HubModule", "as_module", "compose", "load_modules"]


@dataclass
class HubModule:
    """A LoRA module: its config and its A/B tensors under PEFT's keys."""

    config: LoraConfig
    tensors: dict[str, Tensor]
    source: str = "<memory>"

    def save(self, directory: str | os.PathLike, extra_files: dict[str, str | bytes] | None = None) -> None:
        """PEFT format, atomic (with `extra_files`, name -> content, in the same folder).

        Args:
            directory: the adapter folder; it is replaced whole.
            extra_files: file name -> text or bytes written into the same folder in the same step, or None.

        Raises:
            AdapterSaveError: `directory` is a file, or a folder holding other things than adapters.
        """
        write_adapter(directory, self.config, {k: v.contiguous() for k, v in self.tensors.items()}, extra_files=extra_files)


def as_module(item) -> HubModule:
    """A `HubModule` from an adapter directory, a `HubModule`, or a ``(LoraModel, adapter_name)`` pair.

    Args:
        item: an adapter directory, a `HubModule` (returned as is), or a ``(LoraModel, adapter_name)`` pair
            (its tensors are copied to the CPU).

    Returns:
        The `HubModule`.

    Raises:
        AdapterLoadError: the directory's adapter is missing or corrupt.
        LoraConfigError: the directory holds a PiSSA/MiLoRA adapter (its factors belong to a residual base).
    """
    if isinstance(item, HubModule):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], LoraModel):  # (model, adapter name)
        model, name = item
        return HubModule(model.peft_config[name], adapter_state_dict(model, name), f"adapter {name!r}")
    adapter = read_adapter(item)
    if adapter.initial:
        raise LoraConfigError(_RESIDUAL_MODULE.format(item))
    return HubModule(adapter.config, adapter.tensors, str(item))


_RESIDUAL_MODULE = (
    "{} is a PiSSA/MiLoRA adapter: its factors belong to a residual base, not the original model LoraHub composes on. "
    "Export it first (`lorakit export ADAPTER --out DIR`) and use the exported plain LoRA."
)


def load_modules(items: Sequence) -> list[HubModule]:
    """Adapter directories, library folders, `HubModule`s or ``(LoraModel, adapter_name)`` pairs, checked to fit together.

    Args:
        items: adapter directories, library folders (``lorakit hub build``: every module in its index), `HubModule`s
            or ``(LoraModel, adapter_name)`` pairs.

    Returns:
        One `HubModule` per module, in order.

    Raises:
        AdapterLoadError: a directory's adapter is missing or corrupt.
        LoraConfigError: there is no item, a library index is missing a module, a module is PiSSA/MiLoRA or holds more than LoRA factors (modules_to_save,
            biases), or the modules differ in keys, shapes, ``lora_alpha``, ``use_rslora`` or ``alpha_pattern``.
    """
    modules = [as_module(item) for item in expand_libraries(items)]
    _check_compatible(modules)
    return modules


def _check_compatible(modules: list[HubModule]) -> None:
    if not modules:
        raise LoraConfigError("LoraHub needs at least one module.")
    for module in modules:
        if moves_base(module.config.init_lora_weights):
            raise LoraConfigError(_RESIDUAL_MODULE.format(module.source))
    first = modules[0]
    extra = [k for k in first.tensors if ".lora_" not in k]
    if extra:
        raise LoraConfigError(f"{first.source} holds {extra[0]!r}: LoraHub composes LoRA factors only (no modules_to_save or biases).")
    for module in modules[1:]:
        mismatch = _first_mismatch(first, module)
        if mismatch:
            raise LoraConfigError(f"{module.source} does not fit {first.source}: {mismatch}. LoraHub modules must share target modules and rank.")


def _first_mismatch(first: HubModule, other: HubModule) -> str | None:
    for key in first.tensors:
        if key not in other.tensors:
            return f"it has no {key!r}"
        if other.tensors[key].shape != first.tensors[key].shape:
            return f"{key!r} is {tuple(other.tensors[key].shape)}, not {tuple(first.tensors[key].shape)}"
    for key in other.tensors:
        if key not in first.tensors:
            return f"it adapts {key!r}, which the first module does not"
    for name in ("lora_alpha", "use_rslora", "alpha_pattern"):
        if getattr(first.config, name) != getattr(other.config, name):
            return f"{name} is {getattr(other.config, name)!r}, not {getattr(first.config, name)!r}"
    return None


def compose(modules: Sequence, weights: Sequence[float]) -> HubModule:
    """``A = Σ w_i A_i`` and ``B = Σ w_i B_i`` for every layer (negative weights allowed).

    Args:
        modules: adapter directories, `HubModule`s or ``(LoraModel, adapter_name)`` pairs (see `load_modules`).
        weights: one finite number per module.

    Returns:
        A `HubModule` with the first module's config and the composed tensors, each in the first module's dtype.

    Raises:
        AdapterLoadError: a directory's adapter is missing or corrupt.
        LoraConfigError: the modules do not fit together (see `load_modules`), or `weights` is not one finite
            number per module.
    """
    modules = load_modules(modules)
    if len(weights) != len(modules):
        raise LoraConfigError(f"{len(weights)} weights for {len(modules)} modules: give one weight per module.")
    if not all(is_finite_number(x) for x in weights):
        raise LoraConfigError(f"weights {list(weights)} must be finite numbers (no NaN or infinity).")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    tensors = {}
    for key, first in modules[0].tensors.items():
        stack = torch.stack([m.tensors[key].float() for m in modules])  # (N, ...)
        tensors[key] = torch.tensordot(w, stack, dims=1).to(first.dtype)
    return HubModule(modules[0].config, tensors, f"composition of {len(modules)} modules")
