"""One entry point for every method: the config's class picks the model class (LoRA, IA3, the prompt methods),
and a saved adapter's ``peft_type`` picks it when loading, as ``peft.get_peft_model`` / ``PeftModel.from_pretrained``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.adapter_model import AdapterModel
from ..core.config import LoraConfig
from ..core.errors import AdapterLoadError, LoraConfigError
from ..core.lora_model import LoraModel
from ..core.peft_format import CONFIG_NAME, SavedAdapter, read_adapter
from .ia3.config import IA3Config
from .ia3.model import IA3Model
from .lst.config import LSTConfig
from .lst.files import is_lst_folder
from .lst.model import LSTModel
from .prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .prompt.model import PromptModel

__all__ = ["MODEL_CLASSES", "get_peft_model", "load_peft_model", "model_class_for", "read_any_adapter", "read_peft_type"]

# PEFT's peft_type -> (config class, model class)
MODEL_CLASSES: dict[str, tuple[type, type[AdapterModel]]] = {
    "LORA": (LoraConfig, LoraModel),
    "IA3": (IA3Config, IA3Model),
    "PROMPT_TUNING": (PromptTuningConfig, PromptModel),
    "P_TUNING": (PromptEncoderConfig, PromptModel),
    "PREFIX_TUNING": (PrefixTuningConfig, PromptModel),
}


def model_class_for(config: Any) -> type[AdapterModel]:
    """The model class that runs adapters of `config`'s method.

    Args:
        config: a `LoraConfig`, `IA3Config`, `PromptTuningConfig`, `PromptEncoderConfig` or `PrefixTuningConfig`.

    Returns:
        `LoraModel`, `IA3Model` or `PromptModel`.

    Raises:
        LoraConfigError: `config` is none of these.
    """
    for config_class, model_class in MODEL_CLASSES.values():
        if type(config) is config_class:
            return model_class
    names = sorted(c.__name__ for c, _ in MODEL_CLASSES.values())
    raise LoraConfigError(f"config is a {type(config).__name__}; lorakit's methods take one of {names}.")


def get_peft_model(model: nn.Module, config: Any, adapter_name: str = "default", **options: Any) -> AdapterModel | LSTModel:
    """Wrap `model` with an adapter of `config`'s method; on error `model` is left as it was.

    Args:
        model: the model to adapt.
        config: any lorakit method config (see `model_class_for`), or an `LSTConfig` (a side network beside the model).
        adapter_name: the adapter's name, which becomes the active one (LST has one unnamed side network).
        **options: passed to the model class (``tokenizer=`` for prompt tuning's text init, ``fisher_batches=`` for LST).

    Returns:
        The wrapping `AdapterModel`, or an `LSTModel`.

    Raises:
        LoraConfigError: `config` is not a lorakit method config, or does not fit the model.
        AdapterNameError: `adapter_name` is not a valid adapter name.
        TargetModuleError: the targets do not fit the model.
        UnsupportedModelError: the method is not available for this kind of model.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = get_peft_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4)), IA3Config())
        >>> type(model).__name__
        'IA3Model'
    """
    if isinstance(config, LSTConfig):
        return LSTModel(model, config, **options)
    return model_class_for(config)(model, config, adapter_name, **options)


def read_peft_type(directory: str | os.PathLike) -> str:
    """The ``peft_type`` of the adapter saved in `directory` (``"LORA"`` when the field is absent, as PEFT reads it).

    Args:
        directory: a PEFT-format adapter folder.

    Returns:
        One of `MODEL_CLASSES`' keys.

    Raises:
        AdapterLoadError: the folder has no readable config, or the method is not one lorakit implements.
    """
    path = Path(directory) / CONFIG_NAME
    try:
        peft_type = json.loads(path.read_text(encoding="utf-8")).get("peft_type", "LORA")
    except (OSError, ValueError, AttributeError) as err:
        raise AdapterLoadError(f"{path} could not be read as an adapter config ({type(err).__name__}: {err}).") from None
    if not isinstance(peft_type, str) or peft_type not in MODEL_CLASSES:
        raise AdapterLoadError(f"{path} holds a {peft_type!r} adapter; lorakit implements {sorted(MODEL_CLASSES)}.")
    return peft_type


def read_any_adapter(directory: str | os.PathLike) -> SavedAdapter:
    """Config and tensors of an adapter of any method lorakit implements (see `lorakit.core.peft_format.read_adapter`).

    Args:
        directory: a PEFT-format adapter folder.

    Returns:
        The `SavedAdapter`, its config of the method's own class.

    Raises:
        AdapterLoadError: a file is missing or corrupt, or the method is not one lorakit implements.
    """
    return read_adapter(directory, {peft_type: config_class for peft_type, (config_class, _) in MODEL_CLASSES.items()})


def load_peft_model(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                    is_trainable: bool = False) -> AdapterModel | LSTModel:
    """Wrap `model` and load the adapter in `directory` (saved by lorakit or PEFT), whatever its method.

    Args:
        model: the base model the adapter was trained on.
        directory: a PEFT-format adapter folder, or an LST folder (lorakit's own format).
        adapter_name: the name the adapter gets.
        is_trainable: False freezes the adapter and puts the model in eval mode.

    Returns:
        The `LoraModel`, `IA3Model` or `PromptModel` holding the adapter, or the `LSTModel`.

    Raises:
        AdapterLoadError: the files are missing, corrupt, of a method lorakit lacks, or do not fit `model`.
        AdapterNameError: `adapter_name` is not a valid adapter name.
    """
    if is_lst_folder(directory):
        return LSTModel.from_pretrained(model, directory, is_trainable)
    _, model_class = MODEL_CLASSES[read_peft_type(directory)]
    return model_class.from_pretrained(model, directory, adapter_name, is_trainable)
