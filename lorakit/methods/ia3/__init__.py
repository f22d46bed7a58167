"""(IA)³: learned rescaling vectors (Liu et al. 2022), in PEFT's format."""

from .config import IA3Config
from .layers import IA3Layer
from .model import IA3Model, get_ia3_model

__all__ = ["IA3Config", "IA3Layer", "IA3Model", "get_ia3_model"]
