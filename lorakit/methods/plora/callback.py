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
    def __init__(self, plora: PeriodicLoRA) -> None:
        self.plora = plora

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
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
        self.plora.step(optimizer, samples=_global_batch(args))


def _global_batch(args) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


def _per_stage(factor, stage_steps: int, total: int):
    """Position ``k`` of a stage maps to position ``k·total/stage_steps`` of the run-long schedule."""
    return lambda step: factor(int((step % stage_steps) * total / stage_steps))
