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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .atomic import remove_stale_temporaries, staged_directory
from .config import LoraConfig
from .errors import AdapterLoadError, AdapterSaveError, LoraConfigError
from .layers import LoraLayer
from .saved_modules import ModulesToSave
from .targeting import AdapterPlan, module_names, plan_targets

__all__ = [
    "CONFIG_NAME",
    "INITIAL_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "SavedAdapter",
    "b_key",
    "bias_parameters",
    "check_adapter_fits",
    "check_replaceable",
    "check_tensors",
    "factor_keys",
    "is_a_key",
    "load_checked_tensors",
    "read_adapter",
    "write_adapter",
    "write_adapters",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
INITIAL_NAME = "initial_factors.safetensors"
PREFIX = "base_model.model."


# -- key naming -----------------------------------------------------------------------------------
def factor_keys(path: str, is_embedding: bool) -> tuple[str, str]:
    """The saved keys of A and B for the module at `path`.

    Args:
        path: the module's path in the wrapped model, e.g. ``model.layers.0.self_attn.q_proj``.
        is_embedding: the module is an embedding (keys ``lora_embedding_A``/``B``, else ``lora_A.weight``/``lora_B.weight``).

    Returns:
        ``(key_A, key_B)``, both with PEFT's ``base_model.model.`` prefix.
    """
    if is_embedding:
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def is_a_key(key: str) -> bool:
    """Whether a saved key holds an A factor (of a Linear/Conv1D or of an embedding).

    Args:
        key: a key of a saved adapter's tensors.

    Returns:
        True for keys ending in ``.lora_A.weight`` or ``.lora_embedding_A``.
    """
    return key.endswith(A_SUFFIXES)


def b_key(key_A: str) -> str:
    """The saved key of the B factor that goes with A factor `key_A`.

    Args:
        key_A: a key for which `is_a_key` is True.

    Returns:
        The matching ``.lora_B.weight`` or ``.lora_embedding_B`` key.
    """
    if key_A.endswith(".lora_embedding_A"):
        return key_A[: -len("A")] + "B"
    return key_A[: -len("lora_A.weight")] + "lora_B.weight"


def bias_parameters(model: nn.Module, mode: str, lora_paths: set[str]) -> dict[str, nn.Parameter]:
    """Saved key -> bias parameter for bias mode `mode` ("all" or "lora_only").

    Adapted layers keep their bias at ``<path>.base_layer.bias`` (PEFT's name too); biases inside
    modules_to_save travel with the saved copy instead.

    Args:
        model: the wrapped model (``LoraModel.model``), lorakit wrappers included.
        mode: the adapter's bias mode; ``"none"`` gives an empty dict.
        lora_paths: paths of the modules the adapter adapts; ``"lora_only"`` keeps only their biases.

    Returns:
        Saved key (with PEFT's prefix) -> the model's live bias parameter.
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


# -- writing --------------------------------------------------------------------------------------
@dataclass
class SavedAdapter:
    """An adapter as it is on disk: its config, its tensors under PEFT's keys, and (PiSSA/MiLoRA only)
    the initial factors A0/B0 under the same keys."""

    config: Any  # the method's config (LoraConfig, IA3Config, ...): it has ``to_peft_dict``
    tensors: dict[str, Tensor]
    initial: dict[str, Tensor] = field(default_factory=dict)


def check_replaceable(folder: Path, marker: str = CONFIG_NAME) -> None:
    """A save replaces its folder whole. Refuse a folder that holds files but no adapter (neither `marker`, by
    default ``adapter_config.json``, nor sub-folders holding it, PEFT's multi-adapter layout), so a save never
    deletes a folder of other things.

    Args:
        folder: the folder a save would replace.
        marker: the file that marks an adapter folder.

    Raises:
        AdapterSaveError: `folder` is a file, or holds other things than adapters.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise AdapterSaveError(f"{folder} is a file, not a folder: save the adapter to a folder path.")
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    holds_adapter = (folder / marker).is_file() or any((entry / marker).is_file() for entry in entries if entry.is_dir())
    if entries and not holds_adapter:
        raise AdapterSaveError(
            f"{folder} holds {sorted(e.name for e in entries)[:5]} but no adapter; a save replaces the whole folder, so "
            "save into a new folder or an adapter folder."
        )


def write_adapter(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, Tensor],
                  initial: dict[str, Tensor] | None = None, extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write one adapter folder atomically (see `write_adapters`).

    Args:
        directory: the adapter folder; it is replaced whole.
        config: the adapter's config, written as ``adapter_config.json``.
        tensors: saved key -> contiguous tensor, written as ``adapter_model.safetensors``.
        initial: PiSSA/MiLoRA initial factors A0/B0 under the same keys, written as ``initial_factors.safetensors``
            when not empty.
        extra_files: name -> text or bytes, written into the same folder in the same step.

    Raises:
        AdapterSaveError: `directory` is a file, or a folder holding other things than adapters.
    """
    write_adapters(directory, {"": SavedAdapter(config, tensors, initial or {})}, extra_files)


def write_adapters(directory: str | os.PathLike, adapters: dict[str, SavedAdapter],
                   extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write adapters (sub-folder -> adapter; ``""`` is `directory` itself) as one complete folder built
    beside `directory` and swapped in whole: the folder always holds exactly one save, never a mix of two
    and never a stale file of an earlier save (e.g. an old ``initial_factors.safetensors``).

    Args:
        directory: the folder; it is replaced whole.
        adapters: sub-folder name -> `SavedAdapter` (PEFT's multi-adapter layout); ``""`` writes into `directory`.
        extra_files: name -> text or bytes, written into `directory` in the same step (reports, plots).

    Raises:
        AdapterSaveError: `directory` is a file, or a folder holding other things than adapters.
    """
    target = Path(directory)
    check_replaceable(target)
    with staged_directory(target) as staging:
        for name, content in (extra_files or {}).items():
            (staging / name).write_bytes(content.encode() if isinstance(content, str) else content)
        for sub, adapter in adapters.items():
            folder = staging / sub if sub else staging
            folder.mkdir(parents=True, exist_ok=True)
            save_file(adapter.tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
            if adapter.initial:
                save_file(adapter.initial, folder / INITIAL_NAME, metadata={"format": "pt"})
            config_text = json.dumps(adapter.config.to_peft_dict(), indent=2)  # keys sorted; pattern order kept (first match wins)
            (folder / CONFIG_NAME).write_text(config_text + "\n")


# -- reading --------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike, config_types: Mapping[str, type] | None = None) -> SavedAdapter:
    """Config, tensors and initial factors of a PEFT-format adapter; errors name the file and the reason.

    Args:
        directory: the adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``).
        config_types: PEFT ``peft_type`` -> the config class that reads it (``from_peft_dict``); None reads LoRA only.

    Returns:
        A `SavedAdapter` with CPU tensors; its initial factors are empty unless ``initial_factors.safetensors`` is there.

    Raises:
        AdapterLoadError: a file is missing, corrupt, of the wrong kind, of a method not in `config_types`, or holds
            non-float or non-finite values.
    """
    config_types = config_types or {"LORA": LoraConfig}
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.exists():
        remove_stale_temporaries(directory)  # a save killed mid-swap left the complete previous version aside
    if not config_path.is_file():
        raise AdapterLoadError(f"{config_path} does not exist: {directory} is not an adapter directory.")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterLoadError(f"{config_path} is not valid JSON ({err}); the file is corrupt.") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{config_path} holds a JSON {type(data).__name__}, not an object of config fields; the file is corrupt.")
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type not in config_types:
        raise AdapterLoadError(
            f"{config_path} holds a peft_type={peft_type!r} adapter; this loader reads {sorted(config_types)}. Load it with "
            "lorakit.load_peft_model(model, directory), which picks the method from the file."
        )
    try:
        config = config_types[peft_type].from_peft_dict(data)
    except (LoraConfigError, TypeError) as err:
        raise AdapterLoadError(f"{config_path} holds a config lorakit cannot use: {err}") from None
    tensors = _read_tensors(directory / WEIGHTS_NAME, directory)
    return SavedAdapter(config, tensors, _read_initial_factors(directory / INITIAL_NAME, tensors))


def load_checked_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors, refusing anything but finite floating-point values.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        Name -> CPU tensor.

    Raises:
        AdapterLoadError: the file is unreadable, or holds non-float or non-finite values.
    """
    try:
        tensors = load_file(path, device="cpu")
    except Exception as err:  # safetensors raises several types for damaged files
        raise AdapterLoadError(f"{path} could not be read ({type(err).__name__}: {err}); the file is corrupt or truncated.") from None
    for key, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise AdapterLoadError(f"{path}: {key!r} holds {value.dtype} values; adapter tensors are floating point. The file is not an adapter's.")
        if not torch.isfinite(value).all():
            raise AdapterLoadError(f"{path}: {key!r} holds NaN or infinite values; the adapter is damaged (retrain or use an earlier checkpoint).")
    return tensors


def _read_tensors(weights: Path, directory: Path) -> dict[str, Tensor]:
    if weights.is_file():
        return load_checked_tensors(weights)
    if (directory / LEGACY_WEIGHTS_NAME).is_file():
        raise AdapterLoadError(
            f"{directory} holds only {LEGACY_WEIGHTS_NAME} (a pickle); lorakit loads adapters from safetensors only. Convert it "
            "where you trust the file: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)."
        )
    raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME}: the adapter weights are missing.")


def _read_initial_factors(path: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A0/B0 saved beside a PiSSA/MiLoRA adapter, checked against the adapter's own keys and shapes."""
    if not path.is_file():
        return {}
    try:
        initial = load_checked_tensors(path)
    except AdapterLoadError as err:
        raise AdapterLoadError(f"{err} Delete it to load the adapter without it (as a plain adapter on the base it was saved for).") from None
    for key, value in initial.items():
        if key not in tensors or tensors[key].shape != value.shape:
            raise AdapterLoadError(f"{path} does not match the adapter ({key!r}); delete it to load the adapter without it.")
    unpaired = [k for k in initial if (b_key(k) if is_a_key(k) else None) not in initial and is_a_key(k)]
    if unpaired or sum(map(is_a_key, initial)) * 2 != len(initial):
        raise AdapterLoadError(f"{path} holds unpaired A0/B0 factors; the file is damaged. Delete it to load the adapter without it.")
    return initial


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


def check_tensors(tensors: dict[str, Tensor], required: dict[str, tuple], source, optional: dict[str, tuple] | None = None) -> None:
    """Every saved tensor has a place of its shape, and every required place is filled; change nothing.

    Args:
        tensors: saved key -> tensor, as read from the file.
        required: key -> shape the model needs.
        source: where the adapter comes from (e.g. its folder), shown in messages.
        optional: key -> shape the file may hold (e.g. biases, embedding bases), or None.

    Raises:
        AdapterLoadError: a tensor has no place or the wrong shape, or a required one is missing.
    """
    optional = optional or {}
    for key, tensor in tensors.items():
        shape = required.get(key, optional.get(key))
        if shape is None:
            raise AdapterLoadError(
                f"the adapter in {source} has {key!r}, which this model has no place for: the adapter was "
                "trained on a different model, with other target modules or with another method."
            )
        if tuple(tensor.shape) != shape:
            raise AdapterLoadError(
                f"shape mismatch for {key.removeprefix(PREFIX)!r}: the adapter file has {tuple(tensor.shape)}, "
                f"this model needs {shape}. The adapter was trained on a model of another size or with other settings."
            )
    missing = [k for k in required if k not in tensors]
    if missing:
        raise AdapterLoadError(f"the adapter in {source} lacks {len(missing)} tensors this model needs, e.g. {missing[0]!r}.")


def check_adapter_fits(model: nn.Module, adapter: SavedAdapter, source) -> AdapterPlan:
    """Raise `AdapterLoadError` naming the first module whose key or shape does not fit; change nothing.

    Args:
        model: the model to load into (a plain model, or ``LoraModel.model``).
        adapter: the adapter as read by `read_adapter`.
        source: where the adapter comes from (e.g. its folder), shown in messages.

    Returns:
        The `AdapterPlan` of the adapter's config on `model`.

    Raises:
        AdapterLoadError: the config's targets do not fit the model, a tensor has no place or the wrong shape,
            or a tensor the model needs is missing.
    """
    try:
        plan = plan_targets(model, adapter.config)
    except ValueError as err:
        raise AdapterLoadError(f"the adapter in {source} does not fit this model: {err}") from None
    required, optional = _expected_shapes(model, adapter.config, plan)
    check_tensors(adapter.tensors, required, source, optional)
    return plan


