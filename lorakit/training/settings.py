"""The settings of a training run, one dataclass per YAML section, with the embedded defaults.

These dataclasses are the one source of every default: `lorakit train` with no file runs `RunConfig()`
(LoRA r=16 on every linear layer of SmolLM2-135M-Instruct for BIG-bench hyperbaton, where the untrained
model is at chance). Light on purpose (no torch), so the CLI can show defaults instantly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..core.config import FLOAT32_MAX, LoraConfig
from ..core.validation import check_range, check_types
from ..methods.ia3.config import IA3Config
from ..methods.lst.config import LSTConfig
from ..methods.plora.config import PLoRAConfig
from ..methods.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

MAX_LR = FLOAT32_MAX / 10  # AdamW's first step is lr / (1 - beta1) = 10 lr, a float32 number

DEFAULT_PROMPT_TEXT = "Read the question and answer with the correct option."  # prompt tuning's text init

__all__ = ["DEFAULT_PROMPT_TEXT", "SECTIONS", "DataSection", "ModelSection", "RunConfig", "TrainingConfig", "size_of"]


@dataclass
class TrainingConfig:
    """How to train. Sizes are global (all processes together)."""

    output_dir: str = "runs/hyperbaton"
    steps: int = 150
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still checked for NaN/inf)
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    max_length: int = 128
    eval_batch_size: int = 32
    resume: bool = False
    # fp32 | bf16 | fp16: bf16/fp16 store the frozen base in the half type, train the adapter in float32 under autocast
    # (fp16 with a gradient scaler)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass (non-reentrant)
    fsdp: bool = False  # multi-process runs: shard the frozen base over the processes (FSDP2) instead of replicating it
    # pack each micro-batch's items end to end into rows of max_length, attention confined to each item (no padding;
    # causal-LM LoRA, PLoRA and IA3)
    packing: bool = False
    group_by_length: bool = False  # batches of items of similar length (less padding), still a seeded random order
    # stop after this many evaluations (every eval_every steps) without a lower validation loss, and keep the best
    # evaluation's adapter; 0: train all the steps
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0  # how much lower a validation loss must be to count as better
    # which adapter trains: "lora" (the lora section), "plora" (lora + periodic unloading, the plora section),
    # or "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "lst" (each configured by the section of that name)
    method: Literal["lora", "plora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "lst"] = "lora"

    def __post_init__(self) -> None:
        check_types(self, "training.")
        check_range(bool(self.output_dir.strip()), "training.output_dir", self.output_dir, "name a folder")
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size"):
            check_range(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "use an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "early_stopping_patience"):
            check_range(getattr(self, name) >= 0, f"training.{name}", getattr(self, name), "use an integer >= 0")
        check_range(0 < self.lr <= MAX_LR, "training.lr", self.lr, "use a learning rate > 0, e.g. 2e-4 (at most 3.4e37: "
                    "AdamW's first step is 10x the rate, on float32 tensors)")
        check_range(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "use a number >= 0")
        check_range(self.max_grad_norm >= 0, "training.max_grad_norm", self.max_grad_norm, "use a number >= 0 (0: no clipping)")
        check_range(self.early_stopping_min_delta >= 0, "training.early_stopping_min_delta", self.early_stopping_min_delta,
                    "use a number >= 0")
        check_range(self.eval_every > 0 or not self.early_stopping_patience, "training.early_stopping_patience",
                    self.early_stopping_patience, "early stopping reads the evaluations every training.eval_every steps: set eval_every > 0")
        check_range(self.batch_size % self.grad_accum == 0, "training.grad_accum", self.grad_accum,
                    f"it must divide training.batch_size={self.batch_size}")

    def math_settings(self) -> dict:
        """The settings a resumed run must share with the run it continues (everything but bookkeeping)."""
        bookkeeping = {"output_dir", "eval_every", "save_every", "eval_batch_size", "resume", "gradient_checkpointing", "fsdp",
                       "packing"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in bookkeeping}


@dataclass
class ModelSection:
    name: str = "smollm2-135m-instruct"  # an embedded model or a local HF directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "causal-lm" learns completions; "classification" puts a sequence-classification head on the model (e.g. minilm)
    # whose classes are the data's options
    task: Literal["causal-lm", "classification"] = "causal-lm"
    # none | nf4 | fp4 | int8: load the linear layers quantised by bitsandbytes (QLoRA; 4-bit with double quantisation)
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"

    def __post_init__(self) -> None:
        check_types(self, "model.")
        check_range(bool(self.name.strip()), "model.name", self.name, "name an embedded model or a local model folder")


@dataclass
class DataSection:
    # bigbench:<task>[/<subtask>], a .jsonl/.json/.csv/.parquet file, or a folder from datasets' save_to_disk
    source: str = "bigbench:hyperbaton"
    seed: int = 0
    test_size: float = 250  # items (int) or a fraction of the data (float < 1)
    validation_size: float = 50
    max_train: int | None = None
    # chat rows ("messages"): which assistant turns carry the loss: all_assistant | last_assistant | completion
    # (everything from the first assistant turn on); prompt/completion rows have one assistant turn
    train_on: Literal["all_assistant", "last_assistant", "completion"] = "all_assistant"

    def __post_init__(self) -> None:
        check_types(self, "data.")
        check_range(bool(self.source.strip()), "data.source", self.source, "name bigbench:TASK or a data file")
        for name, least in (("test_size", 1), ("validation_size", 0)):  # no validation set: no validation loss
            value = getattr(self, name)
            check_range(0 < value < 1 or (value >= least and float(value).is_integer()), f"data.{name}", value,
                        f"use a count of items (an integer >= {least}) or a fraction between 0 and 1")
        check_range(self.max_train is None or self.max_train >= 1, "data.max_train", self.max_train, "use an integer >= 1 or null")


@dataclass
class RunConfig:
    """A whole training run: one field per YAML section. ``RunConfig()`` is what `lorakit train` runs with no file."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05))
    training: TrainingConfig = field(default_factory=TrainingConfig)
    plora: PLoRAConfig = field(default_factory=PLoRAConfig)  # used when training.method is "plora"
    ia3: IA3Config = field(default_factory=IA3Config)  # the model type's PEFT defaults (Llama: k_proj, v_proj, down_proj)
    prompt_tuning: PromptTuningConfig = field(default_factory=lambda: PromptTuningConfig(
        num_virtual_tokens=20, prompt_tuning_init="TEXT", prompt_tuning_init_text=DEFAULT_PROMPT_TEXT))
    p_tuning: PromptEncoderConfig = field(default_factory=lambda: PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128))
    prefix_tuning: PrefixTuningConfig = field(default_factory=lambda: PrefixTuningConfig(
        num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128))
    lst: LSTConfig = field(default_factory=LSTConfig)  # ladder side-tuning, the paper's r = 8

    def adapter_config(self):
        """The config of the adapter `training.method` trains (the ``lora`` section for "lora" and "plora").

        Returns:
            A `LoraConfig`, `IA3Config`, `PromptTuningConfig`, `PromptEncoderConfig`, `PrefixTuningConfig` or `LSTConfig`.
        """
        method = self.training.method
        return self.lora if method in ("lora", "plora") else getattr(self, method)

    def to_dict(self) -> dict:
        """Every section as plain nested dicts (``dataclasses.asdict``), as written to ``config.yaml``.

        Returns:
            Section name (``model``, ``data``, ``lora``, ``training``, ``plora``) -> field name -> value.
        """
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "lora": LoraConfig, "training": TrainingConfig, "plora": PLoRAConfig,
    "ia3": IA3Config, "prompt_tuning": PromptTuningConfig, "p_tuning": PromptEncoderConfig, "prefix_tuning": PrefixTuningConfig,
    "lst": LSTConfig,
}


def size_of(value: float) -> int | float:
    """YAML gives 250 or 0.2: counts stay ints, fractions stay floats.

    Args:
        value: a size from the config: a count of items or a fraction of the data.

    Returns:
        An int for values >= 1, else a float.
    """
    return int(value) if float(value) >= 1 else float(value)
