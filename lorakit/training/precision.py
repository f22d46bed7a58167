"""Memory settings of a training run: the precision (``training.precision``) and activation checkpointing
(``training.gradient_checkpointing``).

bf16 / fp16 follow PEFT's ``autocast_adapter_dtype`` rule: the frozen base weights are stored in the half
type, the trained parameters (adapters, prompt encoders, side networks) and so their optimizer state stay in
float32, the forward runs under autocast, and the loss is reduced in float32 (the objectives upcast the
logits). fp16 adds a gradient scaler, whose state is part of a checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..core.errors import UnsupportedModelError

__all__ = ["HALF_TYPES", "Precision", "enable_activation_checkpointing"]

HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast, storage types and loss scaling for one precision.

    Args:
        name: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: the device the model trains on.

    Example:
        >>> Precision("fp32", torch.device("cpu")).dtype is None
        True
    """

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device_type = name, device.type
        self.dtype = HALF_TYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Store frozen floating-point parameters in the half type and trainable ones in float32 (fp32: no change).

        Args:
            model: the model to train (its ``requires_grad`` flags say what trains).
        """
        if self.dtype is None:
            return
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(torch.float32 if parameter.requires_grad else self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast context (a no-op for fp32).

        Returns:
            A context manager.
        """
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: scaled for fp16, as it is otherwise.

        Args:
            loss: the loss.

        Returns:
            The (scaled) loss.
        """
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size before clipping (fp16 only).

        Args:
            optimizer: the optimizer holding the gradients' parameters.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update (through the scaler for fp16, which also adjusts its scale).

        Args:
            optimizer: the optimizer.
        """
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state for a checkpoint (empty without one).

        Returns:
            A dict.
        """
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state from a checkpoint.

        Args:
            state: what `state_dict` returned.
        """
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (non-reentrant
    checkpointing, which keeps gradients flowing to adapters inside the blocks).

    Args:
        model: a Hugging Face model, or a lorakit model wrapping one (``.model``). An LST model's backbone runs
            without gradients and stores no activations: there nothing changes.

    Raises:
        UnsupportedModelError: the model does not support activation checkpointing, or trains a prefix (which
            lives in the key/value cache that Hugging Face's checkpointed blocks do not receive).
    """
    from ..methods.lst.model import LSTModel
    from ..methods.prompt.config import PrefixTuningConfig

    if isinstance(model, LSTModel):  # the backbone runs under no_grad and keeps no activations for backward
        return
    configs = getattr(model, "peft_config", {})
    if any(isinstance(configs.get(name), PrefixTuningConfig) for name in getattr(model, "active_adapters", [])):
        raise UnsupportedModelError("prefix tuning puts its prefix in the key/value cache, which Hugging Face's checkpointed "
                                    "blocks do not receive in training: set training.gradient_checkpointing=false for it.")
    inner = getattr(model, "model", model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UnsupportedModelError(f"{type(inner).__name__} does not support activation checkpointing; set "
                                    "training.gradient_checkpointing=false.")
    enable = getattr(inner, "activation_checkpointing_enable", None)  # transformers 5; gradient_checkpointing_enable before
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
