"""lorakit: low-rank adaptation for PyTorch and Hugging Face models, in HF PEFT's on-disk format."""

from .config import LoraConfig
from .errors import AdapterLoadError, AdapterNameError, LoraConfigError, LoraError, TargetModuleError
from .init import INIT_STRATEGIES, register_init
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .model import BASE_ROW, LoraModel, get_lora_model
from .plora import PeriodicLoRA, PLoRAConfig
from . import hub

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraModel",
    "get_lora_model",
    "BASE_ROW",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "ModulesToSave",
    "PeriodicLoRA",
    "PLoRAConfig",
    "hub",
    "INIT_STRATEGIES",
    "register_init",
    "LoraError",
    "LoraConfigError",
    "TargetModuleError",
    "AdapterLoadError",
    "AdapterNameError",
]
