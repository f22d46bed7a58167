"""Exceptions lorakit raises for bad input. Each message names the problem and the fix.

One policy: every error a user's input can cause is a `LoraError` subclass defined here; the CLI prints
its message on one line and exits with status 2. Anything else escaping lorakit is a bug.
"""

from __future__ import annotations

__all__ = [
    "AdapterLoadError",
    "AdapterNameError",
    "AdapterSaveError",
    "DataError",
    "LoraConfigError",
    "LoraError",
    "MixedBatchError",
    "ModelNotFoundError",
    "ResumeError",
    "TargetModuleError",
    "TrainingDivergedError",
    "TrainingOutputError",
    "UnsupportedModelError",
]


class LoraError(Exception):
    """Base class of every lorakit error."""


class LoraConfigError(LoraError, ValueError):
    """A configuration value is invalid."""


class TargetModuleError(LoraError, ValueError):
    """`target_modules` (or `modules_to_save`) does not fit the model."""


class AdapterLoadError(LoraError, ValueError):
    """An adapter on disk is missing, corrupt, or does not fit the model. The model is left unchanged."""


class AdapterSaveError(LoraError, ValueError):
    """An adapter cannot be written where asked (e.g. the folder holds files that are not an adapter's)."""


class AdapterNameError(LoraError, KeyError):
    """An adapter name is invalid, unknown or already taken."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(LoraError, ValueError):
    """Data that cannot be read or used, with what to do about it."""


class MixedBatchError(LoraError, ValueError):
    """A mixed-adapter batch (``adapter_names=``) that cannot be routed row by row."""


class ModelNotFoundError(LoraError, FileNotFoundError):
    """A model name is neither an embedded default nor a local directory, or its package is missing."""


class ResumeError(LoraError, ValueError):
    """``--resume`` cannot continue this run (its settings or data changed, or its checkpoint is damaged)."""


class TrainingDivergedError(LoraError, RuntimeError):
    """The loss or the gradients became NaN or infinite; the step was not applied."""


class TrainingOutputError(LoraError, FileExistsError):
    """The output directory belongs to another run, or is not a directory."""


class UnsupportedModelError(LoraError, ValueError):
    """The model lacks something lorakit needs for this call (e.g. a key/value cache for option scoring)."""
