"""Prompt methods in PEFT's format: prompt tuning, P-tuning, prefix tuning / P-tuning v2."""

from .config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from .model import PromptModel, get_prompt_model

__all__ = ["PrefixTuningConfig", "PromptEncoderConfig", "PromptLearningConfig", "PromptModel", "PromptTuningConfig", "get_prompt_model"]
