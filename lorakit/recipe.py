"""A training run from a YAML config: model + data + LoRA + training sections, zero-shot and fine-tuned
evaluation, and the run directory (adapter, metrics.jsonl, loss.png, summary.md)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import resource
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from .config import LoraConfig
from .errors import LoraConfigError
from .plora import STAGES_DIR, PLoRAConfig
from .train import TrainingConfig, check_output_dir

__all__ = ["RunConfig", "ModelSection", "DataSection", "load_run_config", "run", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = "defaults.yaml"


@dataclass
class ModelSection:
    name: str = "smollm2-135m-instruct"  # an embedded model or a local HF directory
    dtype: str = "float32"


@dataclass
class DataSection:
    source: str = "bigbench:hyperbaton"  # bigbench:<task>[/<subtask>] or a .jsonl/.csv/.parquet file
    seed: int = 0
    test_size: float = 250  # items (int) or a fraction of the data (float < 1)
    validation_size: float = 50
    max_train: int | None = None


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    training: TrainingConfig = field(default_factory=TrainingConfig)
    plora: PLoRAConfig = field(default_factory=PLoRAConfig)  # used when training.method is "plora"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "lora": LoraConfig, "training": TrainingConfig, "plora": PLoRAConfig,
}


def valid_keys() -> list[str]:
    """Every dotted key a config may set, e.g. ``training.steps``."""
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key_error(key: str) -> LoraConfigError:
    candidates = valid_keys() if "." in key else list(SECTIONS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else f" Valid sections: {sorted(SECTIONS)}."
    return LoraConfigError(f"unknown config key {key!r}.{hint}")


def _apply_override(tree: dict, assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or "." not in key:
        raise LoraConfigError(f"override {assignment!r} is not of the form section.key=value (e.g. training.steps=100).")
    section, name = key.split(".", 1)
    tree.setdefault(section, {})[name] = yaml.safe_load(raw)


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The embedded defaults, updated by the YAML file at `path` and then by ``section.key=value`` overrides."""
    tree = yaml.safe_load(resources.files("lorakit").joinpath(DEFAULT_CONFIG).read_text())
    if path is not None:
        user = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(user, dict):
            raise LoraConfigError(f"{path} must hold a mapping of sections (model, data, lora, training).")
        for section, values in user.items():
            if section not in SECTIONS:
                raise _unknown_key_error(str(section))
            tree.setdefault(section, {}).update(values or {})
    for assignment in overrides:
        _apply_override(tree, assignment)
    sections = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            raise _unknown_key_error(section)
        cls = SECTIONS[section]
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise _unknown_key_error(f"{section}.{key}")
        sections[section] = cls(**values)
    return RunConfig(**sections)


# -- running ---------------------------------------------------------------------------------------
def _plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, [m["loss"] for m in history], label="training loss", alpha=0.8)
    evals = [(m["step"], m["eval_loss"]) for m in history if "eval_loss" in m]
    if evals:
        axis.plot(*zip(*evals), "o-", label="validation loss")
    for i, step in enumerate(m["step"] for m in history if m.get("unloaded")):
        axis.axvline(step, color="grey", linestyle=":", alpha=0.7, label="PLoRA unload" if i == 0 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy per completion token")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _summary(config: RunConfig, before: dict, after: dict, trainable: int, total: int, seconds: float, plora=None) -> str:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("task", config.data.source),
        ("test items", str(after["items"])),
        ("majority-label rate", f"{after['majority']:.3f}"),
        ("zero-shot accuracy", f"{before['accuracy']:.3f}" if before else "not measured"),
        ("fine-tuned accuracy", f"{after['accuracy']:.3f}"),
        ("trainable parameters", f"{trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)"),
        ("training time", f"{seconds:.0f} s"),
        ("peak memory (RSS)", f"{peak_mib:.0f} MiB"),
    ]
    if plora is not None:
        share = 100 * plora.unload_seconds / max(seconds, 1e-9)
        rows.append(("PLoRA unloads", f"{len(plora.stages)}, {plora.unload_seconds:.2f} s ({share:.2f}% of training)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(["| what | value |", "|---|---|"] + [f"| {name:{width}} | {value} |" for name, value in rows])


def run(config: RunConfig) -> dict[str, Any]:
    """Train and evaluate as `config` says; returns the summary numbers."""
    from . import data, evaluate, models
    from .model import get_lora_model
    from .train import Trainer

    output = Path(config.training.output_dir)
    check_output_dir(config.training)  # before minutes of loading and zero-shot evaluation
    model, tokenizer = models.load(config.model.name, dtype=getattr(torch, config.model.dtype))
    splits = data.split_examples(
        data.load_examples(config.data.source), config.data.seed, _size(config.data.test_size),
        _size(config.data.validation_size), config.data.max_train,
    )
    before = {} if config.training.resume else evaluate.evaluate(model, tokenizer, splits.test, config.training.eval_batch_size)
    torch.manual_seed(config.training.seed)  # the adapter's init is part of the run: seed it
    lora_model = get_lora_model(model, config.lora)
    items = [data.tokenize_example(tokenizer, ex.prompt, ex.target, config.training.max_length) for ex in splits.train]
    eval_fn = lambda: {"loss": evaluate.token_loss(lora_model, tokenizer, splits.validation, config.training.eval_batch_size)}  # noqa: E731
    plora = None
    if config.training.method == "plora":
        from .plora import PeriodicLoRA

        plora = PeriodicLoRA(lora_model, config.plora, history_dir=output / STAGES_DIR, seed=config.training.seed)
    trainer = Trainer(lora_model, items, config.training, tokenizer.pad_token_id, eval_fn, plora=plora)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    if not trainer.is_main:
        return {}
    after = evaluate.evaluate(lora_model, tokenizer, splits.test, config.training.eval_batch_size)
    lora_model.save_pretrained(output / "adapter")
    if any(layer.initial_factors for _, layer in lora_model.lora_layers()):  # PiSSA/MiLoRA: base was residualised
        from .residual import export_plain_lora

        export_plain_lora(lora_model, output / "adapter_for_original_base")
    if plora is not None and plora.stages:  # the live adapter only fits the unloaded-into base
        from .plora_export import export_plora

        export_plora(output, output / "adapter_for_original_base")
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    _plot_losses(history, output / "loss.png")
    trainable, total = lora_model.get_nb_trainable_parameters()
    table = _summary(config, before, after, trainable, total, seconds, plora)
    (output / "summary.md").write_text(table + "\n")
    (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print("\n" + table)
    return {"before": before, "after": after, "trainable": trainable, "seconds": seconds}


def _size(value: float) -> int | float:
    """YAML gives 250 or 0.2: counts stay ints, fractions stay floats."""
    return int(value) if float(value) >= 1 else float(value)
