"""The one owner of a training run's folder layout. Every path inside a run directory comes from here.

```
<run>/
  adapter/                      the trained adapter (PEFT format)
  adapter_for_original_base/    PiSSA/MiLoRA or PLoRA runs: the update as a plain LoRA for the original base
  checkpoints/step-NNNNNN/      adapter/ (or trainable.safetensors) + trainer_state.pt, one folder per save
                                (+ best.safetensors with early stopping)
  plora/stage-NNNN.safetensors  PLoRA: the factors of every unload
  metrics.jsonl                 one JSON line per optimizer step
  zero_shot.json                the untrained model's test evaluation and sample answers (read back on resume)
  loss.png  summary.md  config.yaml  update_diagnostics.png
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory.

    Args:
        root: the run directory (``training.output_dir``).
    """

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    adapter = property(lambda self: self.root / "adapter")
    adapter_for_original_base = property(lambda self: self.root / "adapter_for_original_base")
    checkpoints = property(lambda self: self.root / "checkpoints")
    plora_stages = property(lambda self: self.root / "plora")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    loss_plot = property(lambda self: self.root / "loss.png")
    summary = property(lambda self: self.root / "summary.md")
    zero_shot = property(lambda self: self.root / "zero_shot.json")  # the base's test scores, kept for a resumed run
    config = property(lambda self: self.root / "config.yaml")
    diagnostics_plot = property(lambda self: self.root / "update_diagnostics.png")

    STATE_FILE = "trainer_state.pt"  # inside a checkpoint
    TRAINABLE_FILE = "trainable.safetensors"  # inside a checkpoint of a model that is not a LoraModel
    BEST_FILE = "best.safetensors"  # inside a checkpoint of an early-stopping run: the best evaluation's trained tensors

    def checkpoint(self, step: int) -> Path:
        """The checkpoint folder of optimizer step `step`.

        Args:
            step: the optimizer step the checkpoint was saved at.

        Returns:
            ``<run>/checkpoints/step-NNNNNN`` (the step zero-padded to six digits); it need not exist.
        """
        return self.checkpoints / f"step-{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (complete = swapped into place, so it holds every file)."""
        found = [p for p in self.checkpoints.glob("step-*") if p.name[5:].isdigit()] if self.checkpoints.is_dir() else []
        return max(found, key=lambda p: int(p.name[5:]), default=None)

    def is_run(self) -> bool:
        """Whether the folder holds a run's adapter (as written by `lorakit train`)."""
        return self.adapter.is_dir()

    def holds_earlier_run(self) -> bool:
        """Checkpoints, metrics or PLoRA stages of an earlier run are here."""
        return self.latest_checkpoint() is not None or self.metrics.exists() or any(self.plora_stages.glob("stage-*"))
