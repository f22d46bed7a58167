"""lorakit: low-rank adaptation for PyTorch and Hugging Face models, in HF PEFT's on-disk format.

The package is layered, each layer importing nothing above it (checked by import-linter in CI)::

    lorakit.core       the adapter library: LoraConfig, layers, LoraModel, inits, the PEFT file format
    lorakit.methods    built on the core: PiSSA/MiLoRA export, PLoRA, LoraHub, IA3, the prompt methods, LST
    lorakit.training   the application: base models, data, evaluation, the trainer, YAML recipes
    lorakit.cli        the `lorakit` command

The names below are the public API. They are imported on first use, so ``import lorakit`` (and
``lorakit --help``) stays instant and pulls in neither torch nor the training stack until needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LoraConfig": "lorakit.core.config",
    "LoraModel": "lorakit.core.lora_model",
    "get_lora_model": "lorakit.core.lora_model",
    "BASE_ROW": "lorakit.core.names",
    "LoraLayer": "lorakit.core.layers",
    "LoraLinear": "lorakit.core.layers",
    "LoraEmbedding": "lorakit.core.layers",
    "ModulesToSave": "lorakit.core.saved_modules",
    "INIT_STRATEGIES": "lorakit.core.inits",
    "register_init": "lorakit.core.inits",
    "PeriodicLoRA": "lorakit.methods.plora.periodic",
    "PLoRAConfig": "lorakit.methods.plora.config",
    "export_plora": "lorakit.methods.plora.export",
    "export_plain_lora": "lorakit.methods.residual",
    "AdapterModel": "lorakit.core.adapter_model",
    "IA3Config": "lorakit.methods.ia3.config",
    "IA3Model": "lorakit.methods.ia3.model",
    "PromptTuningConfig": "lorakit.methods.prompt.config",
    "PromptEncoderConfig": "lorakit.methods.prompt.config",
    "PrefixTuningConfig": "lorakit.methods.prompt.config",
    "PromptModel": "lorakit.methods.prompt.model",
    "LSTConfig": "lorakit.methods.lst.config",
    "LSTModel": "lorakit.methods.lst.model",
    "get_peft_model": "lorakit.methods.peft_methods",
    "load_peft_model": "lorakit.methods.peft_methods",
    "UnsupportedModelError": "lorakit.core.errors",
    "LoraError": "lorakit.core.errors",
    "LoraConfigError": "lorakit.core.errors",
    "TargetModuleError": "lorakit.core.errors",
    "AdapterLoadError": "lorakit.core.errors",
    "AdapterSaveError": "lorakit.core.errors",
    "AdapterNameError": "lorakit.core.errors",
}
# public submodules, by short name
_MODULES = {
    "lorahub": "lorakit.methods.lorahub.search",
    "data": "lorakit.training.data",
    "evaluate": "lorakit.training.evaluate",
    "base_models": "lorakit.training.base_models",
}

__all__ = [
    "BASE_ROW",
    "INIT_STRATEGIES",
    "AdapterLoadError",
    "AdapterModel",
    "AdapterNameError",
    "AdapterSaveError",
    "IA3Config",
    "IA3Model",
    "LSTConfig",
    "LSTModel",
    "LoraConfig",
    "LoraConfigError",
    "LoraEmbedding",
    "LoraError",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "ModulesToSave",
    "PLoRAConfig",
    "PeriodicLoRA",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptModel",
    "PromptTuningConfig",
    "TargetModuleError",
    "UnsupportedModelError",
    "base_models",
    "data",
    "evaluate",
    "export_plain_lora",
    "export_plora",
    "get_lora_model",
    "get_peft_model",
    "load_peft_model",
    "lorahub",
    "register_init",
]

if TYPE_CHECKING:
    from .core.adapter_model import AdapterModel
    from .core.config import LoraConfig
    from .core.errors import (
        AdapterLoadError,
        AdapterNameError,
        AdapterSaveError,
        LoraConfigError,
        LoraError,
        TargetModuleError,
        UnsupportedModelError,
    )
    from .core.inits import INIT_STRATEGIES, register_init
    from .core.layers import LoraEmbedding, LoraLayer, LoraLinear
    from .core.lora_model import LoraModel, get_lora_model
    from .core.names import BASE_ROW
    from .core.saved_modules import ModulesToSave
    from .methods.ia3.config import IA3Config
    from .methods.ia3.model import IA3Model
    from .methods.lorahub import search as lorahub
    from .methods.lst.config import LSTConfig
    from .methods.lst.model import LSTModel
    from .methods.peft_methods import get_peft_model, load_peft_model
    from .methods.plora.config import PLoRAConfig
    from .methods.plora.export import export_plora
    from .methods.plora.periodic import PeriodicLoRA
    from .methods.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
    from .methods.prompt.model import PromptModel
    from .methods.residual import export_plain_lora
    from .training import base_models, data, evaluate


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
