"""Early stopping on validation loss, keeping the best trained tensors.

A run with ``training.early_stopping_patience: P`` evaluates every ``eval_every`` steps as usual; when P
evaluations in a row fail to improve the best validation loss by more than ``early_stopping_min_delta``, it
stops, and the trained tensors of the best evaluation go back into the model before the final evaluation and
the saved adapter. The best tensors and the counters are part of every checkpoint, so a resumed run stops
where the uninterrupted one would, with the same adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core.errors import LoraConfigError

__all__ = ["EarlyStopping", "check_early_stopping", "early_stopping_for"]


def check_early_stopping(patience: int, has_validation: bool) -> None:
    """Early stopping reads the validation loss: refuse it for a run without a validation split.

    Args:
        patience: ``training.early_stopping_patience`` (0: off).
        has_validation: whether the run has a validation split (an ``evaluate`` function).

    Raises:
        LoraConfigError: `patience` > 0 and no validation split.
    """
    if patience and not has_validation:
        raise LoraConfigError("training.early_stopping_patience stops on the validation loss: give the run a validation "
                              "split (data.validation_size > 0) or set early_stopping_patience: 0.")


def early_stopping_for(config, has_validation: bool, periodic_unloading: bool) -> EarlyStopping | None:
    """The early stopping a trainer with `config` runs, or None when ``training.early_stopping_patience`` is 0.

    Args:
        config: the `TrainingConfig`.
        has_validation: whether the run evaluates on a validation split.
        periodic_unloading: whether the run is PLoRA (it folds the adapter into the base as it trains).

    Returns:
        A fresh `EarlyStopping`, or None.

    Raises:
        LoraConfigError: early stopping without a validation split, or with PLoRA.
    """
    if not config.early_stopping_patience:
        return None
    check_early_stopping(config.early_stopping_patience, has_validation)
    if periodic_unloading:
        raise LoraConfigError("PLoRA unloads the adapter into the base as it trains, so an earlier adapter cannot be put "
                              "back: train PLoRA with training.early_stopping_patience: 0.")
    return EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)


@dataclass
class EarlyStopping:
    """The early-stopping state of one run.

    Args:
        patience: evaluations without improvement before stopping (>= 1).
        min_delta: how much lower than the best a validation loss must be to count as an improvement.

    Example:
        >>> import torch
        >>> stopping = EarlyStopping(patience=2)
        >>> weight = torch.zeros(2)
        >>> [stopping.update(step, loss, {"w": weight.fill_(step)}) for step, loss in [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.7)]]
        [False, False, False, True]
        >>> stopping.best_step, stopping.restore({"w": weight}), weight.tolist()
        (2, None, [2.0, 2.0])
    """

    patience: int
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int = 0
    evaluations_since_best: int = 0
    stopped: bool = False
    best_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def update(self, step: int, loss: float, trainable: dict[str, torch.Tensor]) -> bool:
        """Record one validation loss; keep a copy of `trainable` when it is the best so far.

        Args:
            step: the optimizer step the evaluation followed.
            loss: its validation loss.
            trainable: name -> live tensor of everything the run trains.

        Returns:
            Whether the run should stop now.
        """
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evaluations_since_best = loss, step, 0
            self.best_tensors = {name: value.detach().to("cpu", copy=True) for name, value in trainable.items()}
        else:
            self.evaluations_since_best += 1
        self.stopped = self.evaluations_since_best >= self.patience
        return self.stopped

    def restore(self, trainable: dict[str, torch.Tensor]) -> None:
        """Copy the best evaluation's tensors back into the live ones (nothing to do before any evaluation).

        Args:
            trainable: name -> live tensor, as given to `update`.
        """
        with torch.no_grad():
            for name, value in self.best_tensors.items():
                trainable[name].copy_(value)

    def state_dict(self) -> dict:
        """The counters (the best tensors are saved beside them as safetensors)."""
        return {"best_loss": self.best_loss, "best_step": self.best_step, "evaluations_since_best": self.evaluations_since_best,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict, best_tensors: dict[str, torch.Tensor]) -> None:
        """Resume from `state_dict` and the saved best tensors.

        Args:
            state: what `state_dict` returned.
            best_tensors: the best evaluation's tensors, as saved beside it.
        """
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evaluations_since_best, self.stopped = state["evaluations_since_best"], state["stopped"]
        self.best_tensors = best_tensors
