"""Exceptions lorakit raises. Each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["LoraError", "LoraConfigError", "TargetModuleError", "AdapterLoadError", "AdapterNameError"]


class LoraError(Exception):
    """Base class of every lorakit error."""


class LoraConfigError(LoraError, ValueError):
    """A configuration value is invalid."""


class TargetModuleError(LoraError, ValueError):
    """`target_modules` (or `modules_to_save`) does not fit the model."""


class AdapterLoadError(LoraError, ValueError):
    """An adapter on disk is missing, corrupt, or does not fit the model. The model is left unchanged."""


class AdapterNameError(LoraError, KeyError):
    """An adapter name is unknown or already taken."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
