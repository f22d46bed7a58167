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

from .errors import LoraError
from .io import PREFIX, adapter_state_dict, factor_keys, write_adapter
from .layers import LoraEmbedding
from .model import LoraModel

__all__ = ["export_plain_lora", "save_residual_model"]


def _doubled(config):
    """r -> 2r and alpha -> 2 alpha (sqrt(2) alpha with rsLoRA): the same scale s at twice the rank."""
    factor = math.sqrt(2) if config.use_rslora else 2
    return config.replace(
        r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True, svd_solver="auto", svd_cache=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )


def export_plain_lora(model: LoraModel, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write adapter `adapter_name` as a plain LoRA (PEFT format) for the original, un-residualised base."""
    model._check_names([adapter_name])
    tensors = adapter_state_dict(model, adapter_name)
    for path, layer in model.lora_layers():
        if adapter_name not in layer.adapter_names:
            continue
        if adapter_name not in layer.initial_factors:
            raise LoraError(
                f"adapter {adapter_name!r} at {path!r} has no initial factors: only adapters initialised with "
                "PiSSA/MiLoRA (or loaded with their initial_factors.safetensors) need exporting; save it as it is."
            )
        A0, B0 = layer.initial_factors[adapter_name]
        key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
        tensors[key_A] = torch.cat([tensors[key_A], A0.to("cpu", tensors[key_A].dtype)], dim=0)  # (2r, in)
        tensors[key_B] = torch.cat([tensors[key_B], -B0.to("cpu", tensors[key_B].dtype)], dim=1)  # (out, 2r)
    write_adapter(directory, _doubled(model.peft_config[adapter_name]), tensors)


def save_residual_model(model: LoraModel, directory: str | os.PathLike) -> None:
    """Save the base model as it is now (residual weights, no adapters) as a Hugging Face model directory."""
    state = {}
    for key, value in model.model.state_dict().items():
        if ".lora_" in key or ".copies." in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    if not hasattr(model.model, "save_pretrained"):
        raise LoraError("save_residual_model needs a Hugging Face model (with save_pretrained).")
    Path(directory).mkdir(parents=True, exist_ok=True)
    model.model.save_pretrained(directory, state_dict=state, safe_serialization=True)
