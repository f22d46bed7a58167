"""PLoRA inside Hugging Face `Trainer` (and TRL's trainers, which are Trainers): a `TrainerCallback`.

    plora = PeriodicLoRA(lora_model, PLoRAConfig(unload_every=4800))
    trainer = Trainer(model=lora_model, args=args, train_dataset=data, callbacks=[PLoRACallback(plora)])

At each optimizer step the callback counts the global batch (per-device batch x accumulation x
processes) and unloads at stage ends, resetting the optimizer's moments for the adapter
(``optimizer_state="reset"``). With ``lr_schedule="per_stage"`` it makes the Trainer's own schedule
(warm-up and decay, whatever ``lr_scheduler_type`` says) run once per stage instead of once per run:
each stage replays that schedule compressed to the stage's length.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ...core.errors import LoraConfigError
from .periodic import PeriodicLoRA

__all__ = ["PLoRACallback"]


class PLoRACallback(TrainerCallback):
    """PLoRA inside ``transformers.Trainer`` / TRL: counts optimizer steps and unloads at each stage end.

    Args:
        plora: the `PeriodicLoRA` of the model the Trainer trains.
    """

    def __init__(self, plora: PeriodicLoRA) -> None:
        self.plora = plora

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        """With ``lr_schedule="per_stage"``, make the Trainer's schedule restart at every stage.

        Each ``lr_lambdas`` factor of the scheduler is replaced by one replaying the run-long schedule
        compressed to a stage; nothing changes with ``lr_schedule="global"`` or without a scheduler.

        Args:
            args: the Trainer's ``TrainingArguments`` (batch size, accumulation and world size give the global batch).
            state: the Trainer's ``TrainerState`` (its ``max_steps`` is the run-long schedule's length).
            control: the Trainer's ``TrainerControl`` (not changed).
            lr_scheduler: the Trainer's learning-rate scheduler, or None.
            **kwargs: the other objects the Trainer passes to callbacks (model, optimizer...), unused.

        Raises:
            LoraConfigError: the scheduler is not a ``LambdaLR``, or ``unload_every`` samples is not a multiple of
                the global batch.
        """
        if self.plora.config.lr_schedule != "per_stage" or lr_scheduler is None:
            return
        if not hasattr(lr_scheduler, "lr_lambdas"):
            raise LoraConfigError(
                f"lr_schedule='per_stage' restarts a LambdaLR schedule; this Trainer uses {type(lr_scheduler).__name__}. "
                "Use one of the Trainer's built-in lr_scheduler_type values, or PLoRAConfig(lr_schedule='global')."
            )
        stage_steps = self.plora.config.stage_steps(_global_batch(args))
        total = max(state.max_steps, 1)
        lr_scheduler.lr_lambdas = [_per_stage(factor, stage_steps, total) for factor in lr_scheduler.lr_lambdas]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        """Count one optimizer step of a global batch; unload the adapter if a stage ends here.

        Args:
            args: the Trainer's ``TrainingArguments`` (batch size, accumulation and world size give the global batch).
            state: the Trainer's ``TrainerState`` (unused).
            control: the Trainer's ``TrainerControl`` (not changed).
            optimizer: the Trainer's optimizer, whose state for the adapter is reset at an unload (per
                ``optimizer_state``), or None.
            **kwargs: the other objects the Trainer passes to callbacks (model, lr_scheduler...), unused.
        """
        self.plora.step(optimizer, samples=_global_batch(args))


def _global_batch(args) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


def _per_stage(factor, stage_steps: int, total: int):
    """Position ``k`` of a stage maps to position ``k·total/stage_steps`` of the run-long schedule."""
    return lambda step: factor(int((step % stage_steps) * total / stage_steps))
