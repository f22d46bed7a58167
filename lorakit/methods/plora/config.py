"""PLoRA's settings (light: no torch), shared by the method, the trainer and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...core.errors import LoraConfigError
from ...core.validation import check_types

__all__ = ["PLoRAConfig"]



@dataclass
class PLoRAConfig:
    """When and how to unload. ``unload_every`` counts training samples (the paper's unit) or optimizer steps."""

    unload_every: int = 4800
    unit: Literal["samples", "steps"] = "samples"
    momentum: float = 0.0
    momentum_scaling: Literal["sqrt", "linear"] = "sqrt"  # "sqrt" (output-preserving) | "linear"
    optimizer_state: Literal["reset", "keep"] = "reset"  # "reset": the adapter's AdamW moments and step count zeroed at each unload
    lr_schedule: Literal["per_stage", "global"] = "per_stage"  # "per_stage": warm-up and decay restart each stage

    def __post_init__(self) -> None:
        check_types(self, "plora.")
        if self.unload_every < 1:
            raise LoraConfigError(f"plora.unload_every={self.unload_every}: it must be >= 1 ({self.unit}).")
        if not 0 <= self.momentum < 1:
            raise LoraConfigError(f"plora.momentum={self.momentum}: it must be in [0, 1).")

    def stage_steps(self, batch_size: int) -> int:
        """Optimizer steps per stage for a global batch of `batch_size` samples.

        Args:
            batch_size: samples per optimizer step (the global batch).

        Returns:
            ``unload_every`` with ``unit="steps"``, else ``unload_every // batch_size``.

        Raises:
            LoraConfigError: ``unload_every`` counts samples and is not a multiple of `batch_size`.
        """
        if self.unit == "steps":
            return self.unload_every
        if self.unload_every % batch_size:
            raise LoraConfigError(
                f"plora.unload_every={self.unload_every} samples is not a multiple of the batch size {batch_size}: "
                f"stages must end on an optimizer step (e.g. {max(1, round(self.unload_every / batch_size)) * batch_size})."
            )
        return self.unload_every // batch_size
