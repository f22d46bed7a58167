"""Adapters between a live `LoraModel` and PEFT's on-disk format: which tensors an adapter is (under PEFT's
keys), and putting checked tensors into a model as one transaction. The files themselves are
`peft_format`'s business; this module is the bridge."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .layers import LoraEmbedding
from .peft_format import (
    PREFIX,
    bias_parameters,
    factor_keys,
)

__all__ = [
    "adapter_parameters",
    "adapter_state_dict",
    "apply_adapter",
    "initial_factors",
]

# `model` below is a lorakit LoraModel (duck-typed: this module must not import lora_model, which imports it).


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The tensors PEFT would save for adapter `name`, under PEFT's keys, on the CPU.

    Args:
        model: a `LoraModel` holding the adapter.
        name: the adapter's name.

    Returns:
        Saved key -> detached, contiguous CPU copy: the A and B factors, modules_to_save copies and (per the
        adapter's bias mode) biases; embedding base weights are left out.
    """
    return {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in adapter_parameters(model, name, with_embedding_bases=False)
    }


def adapter_parameters(model: nn.Module, name: str, with_embedding_bases: bool = True) -> Iterator[tuple[str, Tensor]]:
    """(saved key, live tensor) pairs of adapter `name`.

    Args:
        model: a `LoraModel` holding the adapter.
        name: the adapter's name.
        with_embedding_bases: also yield the base weights of adapted embeddings, which PEFT may save
            (``save_embedding_layers``) and lorakit accepts on load but does not write.

    Yields:
        ``(key, tensor)`` under PEFT's keys: the A and B factors, the parameters of modules_to_save copies and
        (per the adapter's bias mode) biases. The tensors are the model's own parameters, not copies.
    """
    lora_paths = set()
    for path, layer in model.lora_layers():
        if name not in layer.adapter_names:
            continue
        lora_paths.add(path)
        key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
        yield key_A, layer.lora_A[name]
        yield key_B, layer.lora_B[name]
        if with_embedding_bases and isinstance(layer, LoraEmbedding):
            yield f"{PREFIX}{path}.base_layer.weight", layer.base_layer.weight
    for path, wrapper in model.saved_modules():
        if name in wrapper.copies:
            for key, value in wrapper.copies[name].state_dict(keep_vars=True).items():
                yield f"{PREFIX}{path}.{key}", value
    yield from bias_parameters(model.model, model.peft_config[name].bias, lora_paths).items()


def initial_factors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """A0 and B0 of adapter `name` under the adapter's own keys (empty unless its init moved the base).

    Args:
        model: a `LoraModel` holding the adapter.
        name: the adapter's name.

    Returns:
        Saved key -> detached, contiguous CPU tensor: A0 (r, in) under the A key, B0 (out, r) under the B key.
    """
    tensors = {}
    for path, layer in model.lora_layers():
        if name in layer.initial_factors:
            key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
            tensors[key_A], tensors[key_B] = (t.detach().to("cpu").contiguous() for t in layer.initial_factors[name])
    return tensors


def apply_adapter(model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, Tensor], is_trainable: bool,
                  initial: dict[str, Tensor] | None = None) -> None:
    """Add adapter `name` and fill it with checked `tensors` (and PiSSA/MiLoRA `initial` factors); on any
    error the model is left exactly as it was.

    Args:
        model: the `LoraModel` to add to.
        name: the new adapter's name.
        config: its `LoraConfig`.
        tensors: saved key -> tensor, already checked against the model (see `check_adapter_fits`); each is
            cast to its parameter's dtype.
        is_trainable: False freezes the adapter's parameters and puts the model in eval mode.
        initial: PiSSA/MiLoRA initial factors A0/B0 under the adapter's keys, or None.

    Raises:
        AdapterNameError: `name` is invalid or taken.
        LoraConfigError, TargetModuleError: `config` does not fit the model.
    """
    with model.transaction():
        model.add_adapter(name, config, initialize=False)
        destinations = dict(adapter_parameters(model, name))
        with torch.no_grad():
            for key, tensor in tensors.items():
                param = destinations[key]
                param.copy_(tensor.to(param.dtype))
        for path, layer in model.lora_layers():
            key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
            if name in layer.adapter_names and key_A in (initial or {}):
                layer.set_initial_factors(name, initial[key_A], initial[key_B])
        if not is_trainable:
            for key in destinations:
                destinations[key].requires_grad_(False)
    if not is_trainable:
        model.eval()
