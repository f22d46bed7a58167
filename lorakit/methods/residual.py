"""Adapters whose init moved the base weights (PiSSA, MiLoRA): their trained factors only make sense on
the residual base ``W - s·B0@A0``. Two ways out:

* `export_plain_lora`: one plain LoRA for the *original* base. The total change is
  ``ΔW = s·(B@A - B0@A0)`` (PiSSA, arXiv 2404.02948, Sec. 4 "conversion"), written exactly as a rank-2r
  adapter ``A' = [A; A0]``, ``B' = [B, -B0]`` with r and alpha doubled (alpha times sqrt(2) with rsLoRA)
  so that the scale s is unchanged. Any PEFT or lorakit user loads it on the untouched base model.
* `save_residual_model`: the residual base itself as a Hugging Face model directory, to which the
  saved adapter applies as is (the official MiLoRA workflow).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LoraError
from ..core.loading import adapter_state_dict, initial_factors
from ..core.lora_model import LoraModel
from ..core.peft_format import INITIAL_NAME, is_a_key, read_adapter, write_adapter

__all__ = ["export_plain_lora", "export_plain_lora_files", "plain_lora_tensors", "save_residual_model", "save_residual_model_files"]



def _doubled(config):
    """r -> 2r and alpha -> 2 alpha (sqrt(2) alpha with rsLoRA): the same scale s at twice the rank."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True, svd_solver="auto", svd_cache=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )


def plain_lora_tensors(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved adapter tensors -> plain LoRA tensors for the original base: ``A' = [A; A0]``, ``B' = [B, -B0]``.

    Args:
        tensors: the adapter's saved tensors, under PEFT's keys.
        initial: its initial factors A0/B0 under the same keys.

    Returns:
        A new dict: A factors become (2r, in), B factors (out, 2r); other tensors (modules_to_save, biases) are unchanged.

    Raises:
        LoraError: an A factor has no initial factor (the adapter's init did not move the base).
    """
    missing = [k for k in tensors if is_a_key(k) and k not in initial]
    if missing:
        raise LoraError(
            f"{missing[0]!r} has no initial factors: only adapters initialised with PiSSA/MiLoRA (and saved "
            "with their initial_factors.safetensors) need exporting; use the adapter as it is."
        )
    plain = dict(tensors)
    for key, start in initial.items():  # start: A0 under an A key, B0 under a B key
        if is_a_key(key):
            plain[key] = torch.cat([tensors[key], start.to(tensors[key].dtype)], dim=0)  # (2r, in)
        else:
            plain[key] = torch.cat([tensors[key], -start.to(tensors[key].dtype)], dim=1)  # (out, 2r)
    return plain


def export_plain_lora(model: LoraModel, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write adapter `adapter_name` as a plain LoRA (PEFT format) for the original, un-residualised base.

    Args:
        model: the `LoraModel` holding the PiSSA/MiLoRA adapter.
        directory: the output adapter folder; it is replaced whole.
        adapter_name: the adapter to export.

    Raises:
        AdapterNameError: `model` has no adapter `adapter_name`.
        LoraError: the adapter has no initial factors (its init did not move the base).
        AdapterSaveError: `directory` is a file, or a folder holding other things than adapters.
    """
    model.check_names([adapter_name])
    plain = plain_lora_tensors(adapter_state_dict(model, adapter_name), initial_factors(model, adapter_name))
    write_adapter(directory, _doubled(model.peft_config[adapter_name]), plain)


def export_plain_lora_files(adapter_dir: str | os.PathLike, directory: str | os.PathLike) -> None:
    """`export_plain_lora` from a saved PiSSA/MiLoRA adapter directory alone (no model needed).

    Args:
        adapter_dir: a PiSSA/MiLoRA adapter saved by lorakit (with ``initial_factors.safetensors``).
        directory: the output adapter folder; it is replaced whole.

    Raises:
        AdapterLoadError: the adapter in `adapter_dir` is missing or corrupt.
        LoraError: it has no ``initial_factors.safetensors``.
        AdapterSaveError: `directory` is a file, or a folder holding other things than adapters.
    """
    adapter = read_adapter(adapter_dir)
    if not adapter.initial:
        path = Path(adapter_dir) / INITIAL_NAME
        raise LoraError(f"{path} does not exist: {adapter_dir} is not a PiSSA/MiLoRA adapter saved by lorakit.")
    write_adapter(directory, _doubled(adapter.config), plain_lora_tensors(adapter.tensors, adapter.initial))


def save_residual_model(model: LoraModel, directory: str | os.PathLike) -> None:
    """Save the base model as it is now (residual weights, no adapters) as a Hugging Face model directory.

    Args:
        model: a `LoraModel` over a Hugging Face model; adapter factors and modules_to_save copies are left
            out and wrapped layers are saved under their original names.
        directory: the output folder (created if missing).

    Raises:
        LoraError: the wrapped model has no ``save_pretrained``.
    """
    state = {}
    for key, value in model.model.state_dict().items():
        if ".lora_" in key or ".copies." in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    if not hasattr(model.model, "save_pretrained"):
        raise LoraError("save_residual_model needs a Hugging Face model (with save_pretrained).")
    Path(directory).mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(directory, state_dict=state, safe_serialization=True)


def save_residual_model_files(adapter_dir: str | os.PathLike, base: nn.Module, directory: str | os.PathLike) -> None:
    """The residual base ``W - s·B0@A0`` for a saved PiSSA/MiLoRA adapter, rebuilt from the original base
    model `base` (changed in place: it becomes the residual) and the adapter's initial factors.

    Args:
        adapter_dir: a PiSSA/MiLoRA adapter saved by lorakit (with ``initial_factors.safetensors``).
        base: the original base model the adapter was made for.
        directory: the output folder for the residual model (created if missing).

    Raises:
        AdapterLoadError: the adapter is missing or corrupt, or does not fit `base`.
        LoraError: the adapter has no initial factors (it is not a PiSSA/MiLoRA adapter saved by lorakit).
    """
    if not read_adapter(adapter_dir).initial:
        raise LoraError(f"{adapter_dir} has no initial factors: it is not a PiSSA/MiLoRA adapter saved by lorakit.")
    lora_model = LoraModel.from_pretrained(base, adapter_dir)
    for _, layer in lora_model.lora_layers():
        for name in list(layer.initial_factors):
            layer.residualise(name)
    save_residual_model(lora_model, directory)
