"""Adapters on disk, in HF PEFT's exact format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r), for embeddings
``.lora_embedding_A`` (r, vocab) / ``.lora_embedding_B`` (dim, r), modules_to_save as
``base_model.model.<path>.<param>`` and trained biases under their own paths. Writes are atomic;
loads check every key and shape against the model before changing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import LoraConfig
from .errors import AdapterLoadError, LoraConfigError
from .layers import LoraEmbedding, LoraLayer, ModulesToSave
from .targeting import AdapterPlan, module_names, plan_targets

if TYPE_CHECKING:
    from .model import LoraModel

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "INITIAL_NAME", "save_adapter", "write_adapter", "initial_factors", "read_adapter", "check_adapter_fits", "load_adapter", "adapter_state_dict"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
INITIAL_NAME = "initial_factors.safetensors"
PREFIX = "base_model.model."


# -- key naming -----------------------------------------------------------------------------------
def factor_keys(path: str, is_embedding: bool) -> tuple[str, str]:
    """The saved keys of A and B for the module at `path`."""
    if is_embedding:
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def is_a_key(key: str) -> bool:
    """Whether a saved key holds an A factor (of a Linear/Conv1D or of an embedding)."""
    return key.endswith(A_SUFFIXES)


def b_key(key_A: str) -> str:
    """The saved key of the B factor that goes with A factor `key_A`."""
    if key_A.endswith(".lora_embedding_A"):
        return key_A[: -len("A")] + "B"
    return key_A[: -len("lora_A.weight")] + "lora_B.weight"


def bias_parameters(model: nn.Module, mode: str, lora_paths: set[str]) -> dict[str, nn.Parameter]:
    """Saved key -> bias parameter for bias mode `mode` ("all" or "lora_only").

    Adapted layers keep their bias at ``<path>.base_layer.bias`` (PEFT's name too); biases inside
    modules_to_save travel with the saved copy instead.
    """
    if mode == "none":
        return {}
    found = {}
    for path in module_names(model):
        module = model.get_submodule(path)
        adapted = path in lora_paths
        if isinstance(module, ModulesToSave) or (mode == "lora_only" and not adapted):
            continue
        wrapped = adapted or isinstance(module, LoraLayer)
        bias = getattr(module.base_layer if isinstance(module, LoraLayer) else module, "bias", None)
        if isinstance(bias, nn.Parameter):
            found[f"{PREFIX}{path}{'.base_layer' if wrapped else ''}.bias"] = bias
    return found


def adapter_state_dict(model: "LoraModel", name: str) -> dict[str, Tensor]:
    """The tensors PEFT would save for adapter `name`, under PEFT's keys, on the CPU."""
    return {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in adapter_parameters(model, name, with_embedding_bases=False)
    }


def adapter_parameters(model: "LoraModel", name: str, with_embedding_bases: bool = True) -> Iterator[tuple[str, Tensor]]:
    """(saved key, live tensor) pairs of adapter `name`.

    ``with_embedding_bases`` adds the base weights of adapted embeddings, which PEFT may save
    (``save_embedding_layers``) and lorakit accepts on load but does not write."""
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


# -- writing --------------------------------------------------------------------------------------
def save_adapter(model: "LoraModel", directory: str | os.PathLike, name: str) -> None:
    """Write adapter `name` to `directory` in PEFT's format (see `write_adapter`). An adapter whose init
    moved the base (PiSSA, MiLoRA) also gets ``initial_factors.safetensors`` (A0, B0; PEFT ignores it),
    so it can be exported for the original base after a reload."""
    model._check_names([name])
    config = model.peft_config[name]
    if config.base_model_name_or_path is None:
        source = getattr(getattr(model.model, "config", None), "_name_or_path", None)
        config = config.replace(base_model_name_or_path=source or None)
    write_adapter(directory, config, adapter_state_dict(model, name), initial_factors(model, name))


def initial_factors(model: "LoraModel", name: str) -> dict[str, Tensor]:
    """A0 and B0 of adapter `name` under the adapter's own keys (empty unless its init moved the base)."""
    tensors = {}
    for path, layer in model.lora_layers():
        if name in layer.initial_factors:
            key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
            tensors[key_A], tensors[key_B] = (t.detach().to("cpu").contiguous() for t in layer.initial_factors[name])
    return tensors


def write_adapter(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, Tensor], initial: dict[str, Tensor] | None = None) -> None:
    """Write an adapter directory atomically: files go to a temporary folder beside it and are renamed
    into place (the weights first, the config last), so a crash never leaves a half-written adapter."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    names = [WEIGHTS_NAME, CONFIG_NAME]
    try:
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        if initial:
            save_file(initial, staging / INITIAL_NAME, metadata={"format": "pt"})
            names.insert(1, INITIAL_NAME)
        (staging / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
        if not target.exists():
            os.replace(staging, target)
            return
        for file_name in names:
            os.replace(staging / file_name, target / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- reading --------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Config and tensors of a PEFT-format adapter; errors name the file and the reason."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterLoadError(f"{config_path} does not exist: {directory} is not an adapter directory.")
    try:
        config = LoraConfig.from_peft_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{config_path} is not valid JSON ({err}); the file is corrupt.") from None
    except (LoraConfigError, TypeError) as err:
        raise AdapterLoadError(f"{config_path} holds a config lorakit cannot use: {err}") from None
    return config, _read_tensors(directory)


def _read_tensors(directory: Path) -> dict[str, Tensor]:
    weights, legacy = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
    try:
        if weights.is_file():
            return load_file(weights, device="cpu")
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for damaged files
        path = weights if weights.is_file() else legacy
        raise AdapterLoadError(f"{path} could not be read ({type(err).__name__}: {err}); the file is corrupt or truncated.") from None
    raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}): the adapter weights are missing.")


def _expected_shapes(model: nn.Module, config: LoraConfig, plan: AdapterPlan) -> tuple[dict, dict]:
    """(required key -> shape, optional key -> shape) for this config on this model."""
    required, optional = {}, {}
    for t in plan.targets:
        key_A, key_B = factor_keys(t.path, t.is_embedding)
        required[key_A], required[key_B] = (t.rank, t.in_features), (t.out_features, t.rank)
        if t.is_embedding:
            optional[f"{PREFIX}{t.path}.base_layer.weight"] = (t.in_features, t.out_features)
    for path in plan.modules_to_save:
        module = model.get_submodule(path)
        module = module.base_layer if isinstance(module, ModulesToSave) else module
        for key, value in module.state_dict().items():
            required[f"{PREFIX}{path}.{key}"] = tuple(value.shape)
    lora_paths = {t.path for t in plan.targets}
    for key, bias in bias_parameters(model, config.bias, lora_paths).items():
        optional[key] = tuple(bias.shape)
    return required, optional


def check_adapter_fits(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], source) -> AdapterPlan:
    """Raise `AdapterLoadError` naming the first module whose key or shape does not fit; change nothing."""
    try:
        plan = plan_targets(model, config)
    except ValueError as err:
        raise AdapterLoadError(f"the adapter in {source} does not fit this model: {err}") from None
    required, optional = _expected_shapes(model, config, plan)
    for key, tensor in tensors.items():
        shape = required.get(key, optional.get(key))
        if shape is None:
            raise AdapterLoadError(
                f"the adapter in {source} has {key!r}, which this model has no place for: the adapter was "
                "trained on a different model or with different target_modules."
            )
        if tuple(tensor.shape) != shape:
            raise AdapterLoadError(
                f"shape mismatch for module {key.removeprefix(PREFIX)!r}: the adapter file has {tuple(tensor.shape)}, "
                f"this model needs {shape}. The adapter was trained on a model of another size or with another rank."
            )
    missing = [k for k in required if k not in tensors]
    if missing:
        raise AdapterLoadError(f"the adapter in {source} lacks {len(missing)} tensors this model needs, e.g. {missing[0]!r}.")
    return plan


def apply_adapter(model: "LoraModel", name: str, config: LoraConfig, tensors: dict[str, Tensor], is_trainable: bool) -> None:
    """Add adapter `name` and fill it with checked `tensors`."""
    model.add_adapter(name, config, initialize=False)
    destinations = dict(adapter_parameters(model, name))
    with torch.no_grad():
        for key, tensor in tensors.items():
            param = destinations[key]
            param.copy_(tensor.to(param.dtype))
    if not is_trainable:
        for key in destinations:
            destinations[key].requires_grad_(False)
        model.eval()



def load_adapter(model: "LoraModel", directory: str | os.PathLike, name: str, is_trainable: bool = False) -> None:
    """Read, check against the model, then add: a bad file leaves the model exactly as it was."""
    config, tensors = read_adapter(directory)
    if name in model.peft_config:
        raise AdapterLoadError(f"an adapter named {name!r} is loaded already; pass another adapter_name.")
    check_adapter_fits(model.model, config, tensors, directory)
    add_checked_adapter(model, directory, name, config, tensors, is_trainable)


def add_checked_adapter(model: "LoraModel", directory: str | os.PathLike, name: str, config: LoraConfig,
                        tensors: dict[str, Tensor], is_trainable: bool) -> None:
    """Add an adapter already read from `directory` and checked against the model, with its initial factors."""
    initial = _read_initial_factors(Path(directory), tensors)
    apply_adapter(model, name, config, tensors, is_trainable)
    for path, layer in model.lora_layers():
        key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
        if name in layer.adapter_names and key_A in initial:
            layer.initial_factors[name] = (initial[key_A].to(layer.weight.dtype), initial[key_B].to(layer.weight.dtype))


def _read_initial_factors(directory: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A0/B0 saved beside a PiSSA/MiLoRA adapter, checked against the adapter's own shapes."""
    path = directory / INITIAL_NAME
    if not path.is_file():
        return {}
    try:
        initial = load_file(path, device="cpu")
    except Exception as err:
        raise AdapterLoadError(f"{path} could not be read ({type(err).__name__}: {err}); delete it to load the adapter without it.") from None
    for key, value in initial.items():
        if key not in tensors or tensors[key].shape != value.shape:
            raise AdapterLoadError(f"{path} does not match the adapter ({key!r}); delete it to load the adapter without it.")
    return initial
