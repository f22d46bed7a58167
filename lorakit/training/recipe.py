"""A training run from a YAML config: model + data + adapter + training sections, zero-shot and fine-tuned
evaluation, and the run directory (adapter, metrics.jsonl, loss.png, summary.md)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import resource
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.atomic import atomic_write_text
from ..core.errors import LoraConfigError
from ..core.plotting import pyplot, save_png
from ..core.run_layout import RunLayout
from ..core.validation import coerce
from .early_stopping import check_early_stopping
from .settings import (
    SECTIONS,
    DataSection,
    ModelSection,
    RunConfig,
    TrainingConfig,
    size_of,
)
from .trainer import check_output_dir

__all__ = ["DataSection", "ModelSection", "RunConfig", "TrainingConfig", "load_run_config", "run", "size_of", "valid_keys"]


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
    tree.setdefault(section, {})[name] = _parse_yaml(raw, f"the value of {key}")


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise LoraConfigError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None


def _read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoraConfigError(f"config file {str(path)!r} does not exist (run `lorakit train` with no file for the defaults).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LoraConfigError(f"{path} is not UTF-8 text: save the config as a UTF-8 YAML file.") from None
    user = _parse_yaml(text, str(path)) or {}
    if not isinstance(user, dict):
        raise LoraConfigError(f"{path} must hold a mapping of sections ({', '.join(SECTIONS)}), not a {type(user).__name__}.")
    return user


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The embedded defaults, updated by the YAML file at `path` and then by ``section.key=value`` overrides.

    Text values are converted to each field's type (``training.lr=1e-3`` is a float).

    Args:
        path: a YAML file with model/data/training sections and the method's section (lora, plora, ia3, prompt_tuning,
            p_tuning, prefix_tuning), or None for the defaults alone.
        overrides: ``section.key=value`` assignments applied after the file, in order; values are read as YAML.

    Returns:
        The validated `RunConfig`.

    Raises:
        LoraConfigError: the file is missing or not YAML, a key is unknown (with the closest valid one), or a value
            has the wrong type or range (naming the field).
    """
    tree = RunConfig().to_dict()  # the embedded defaults: the dataclasses are their one source
    user = _read_config_file(path) if path is not None else {}
    for section, values in user.items():
        if section not in SECTIONS:
            raise _unknown_key_error(str(section))
        if values is not None and not isinstance(values, dict):
            raise LoraConfigError(f"section {section!r} must be a mapping of keys to values, not a {type(values).__name__}.")
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
        try:
            sections[section] = cls(**coerce(cls, values))
        except LoraConfigError as err:
            message = str(err)
            raise LoraConfigError(message if message.startswith(f"{section}.") else f"{section}.{message}") from None
    return RunConfig(**sections)


# -- running ---------------------------------------------------------------------------------------
def _plot_losses(history: list[dict], path: Path, loss_unit: str) -> None:
    plt = pyplot()

    steps = [m["step"] for m in history]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, [m["loss"] for m in history], label="training loss", alpha=0.8)
    evals = [(m["step"], m["eval_loss"]) for m in history if "eval_loss" in m]
    if evals:
        axis.plot(*zip(*evals), "o-", label="validation loss")
    for i, step in enumerate(m["step"] for m in history if m.get("unloaded")):
        axis.axvline(step, color="grey", linestyle=":", alpha=0.7, label="PLoRA unload" if i == 0 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"cross-entropy per {loss_unit}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_png(figure, path, dpi=120)


def _summary(config: RunConfig, before: dict, after: dict, trainable: int, total: int, seconds: float, plora=None,
             trainer=None) -> str:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        ("task", config.data.source),
        ("method", config.training.method),
        ("test items", str(after["items"])),
        ("majority-label rate", f"{after['majority']:.3f}"),
        ("zero-shot accuracy", f"{before['accuracy']:.3f}" if before else "not measured"),
        ("fine-tuned accuracy", f"{after['accuracy']:.3f}"),
        ("trainable parameters", f"{trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)"),
        ("training time", f"{seconds:.0f} s"),
        ("peak memory (RSS)", f"{peak_mib:.0f} MiB"),
    ]
    if trainer is not None and trainer.world > 1:
        how = f"FSDP, {trainer.weights_share:.0%} of the weights on each" if trainer.sharded else "DDP, the whole model on each"
        rows.append(("processes", f"{trainer.world} ({how})"))
    if trainer is not None and trainer.early_stopping is not None:
        stopping = trainer.early_stopping
        how = f"stopped at step {trainer.step}" if stopping.stopped else f"ran all {trainer.step} steps"
        rows.append(("early stopping", f"{how}; adapter of step {stopping.best_step} (validation loss {stopping.best_loss:.4f})"))
    if plora is not None:
        share = 100 * plora.unload_seconds / max(seconds, 1e-9)
        rows.append(("PLoRA unloads", f"{len(plora.stages)}, {plora.unload_seconds:.2f} s ({share:.2f}% of training)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(["| what | value |", "|---|---|"] + [f"| {name:{width}} | {value} |" for name, value in rows])


SAMPLES = 2  # test items whose answers before and after fine-tuning the summary shows


def _sample_answers(examples, before: list[str], after: list[str]) -> str:
    """The summary's sample answers: each test item's prompt, expected answer, and the model's before and after."""
    shorten = lambda text: textwrap.shorten(text, 300, placeholder=" ...") or "(empty)"  # noqa: E731
    lines = ["## Sample answers (first test items)"]
    for number, example in enumerate(examples):
        lines += ["", f"**{number + 1}.** {shorten(example.prompt)}", "", f"- expected: {shorten(example.target)}",
                  f"- before fine-tuning: {shorten(before[number]) if before else '(resumed run: not measured)'}",
                  f"- after fine-tuning: {shorten(after[number])}"]
    return "\n".join(lines)


def _adapted_model(model, tokenizer, config: RunConfig, items: list[dict], task):
    """The model with the adapter (or LST side network) `training.method` trains. On a classifier, LoRA and IA3
    also train the new classification head in full (PEFT's ``task_type="SEQ_CLS"`` rule; the prompt methods apply
    it themselves)."""
    method = config.training.method
    if method == "lst":
        from ..methods.lst.model import LSTModel

        size, pad_id = config.training.batch_size, tokenizer.pad_token_id
        batches = None
        if config.lst.init == "fisher":
            batches = [{k: v for k, v in task.objective(pad_id).batch(items[i : i + size]).items() if k != "position_ids"}
                       for i in range(0, min(len(items), size * config.lst.fisher_batches), size)]
        return LSTModel(model, config.lst, fisher_batches=batches)
    from ..methods.peft_methods import get_peft_model

    adapter_config = config.adapter_config()
    if task.num_labels is not None and method in ("lora", "plora", "ia3"):  # PEFT's SEQ_CLS rule: the new head trains in full
        from ..core.targeting import with_classifier_heads

        adapter_config = adapter_config.replace(task_type="SEQ_CLS", modules_to_save=with_classifier_heads(adapter_config.modules_to_save))
    options = {"tokenizer": tokenizer} if method == "prompt_tuning" else {}
    return get_peft_model(model, adapter_config, **options)


PACKABLE_METHODS = ("lora", "plora", "ia3")  # weight adapters; the prompt methods and LST change what a row attends to


def _check_packing(config: RunConfig) -> None:
    """``training.packing`` needs a causal LM trained by a weight adapter."""
    if not config.training.packing:
        return
    if config.model.task != "causal-lm":
        raise LoraConfigError("training.packing packs completions for a causal LM; a classifier reads one item per row: "
                              "set training.packing: false (training.group_by_length: true saves padding instead).")
    if config.training.method not in PACKABLE_METHODS:
        raise LoraConfigError(f"training.packing works with {', '.join(PACKABLE_METHODS)}; {config.training.method} adds tokens "
                              "or a side network to each row: set training.packing: false (or training.group_by_length: true).")


def _objective(config: RunConfig, task, model, items, pad_id: int):
    """The task's training objective, packed when ``training.packing`` (checked on two items first)."""
    if not config.training.packing:
        return task.objective(pad_id)
    from .objectives import PackedCompletionObjective, check_packing

    check_packing(model, [items[0], items[1]], pad_id, next(model.parameters()).device)
    return PackedCompletionObjective(pad_id, config.training.max_length)


def _zero_shot(layout: RunLayout, resume: bool, measure: Callable[[], tuple[dict, list[str]]]) -> tuple[dict, list[str]]:
    """The untrained model's test evaluation and sample answers: measured and kept in the run folder, or on resume
    read back from it (``({}, [])`` when the resumed run never kept them)."""
    if resume:
        if not layout.zero_shot.is_file():
            return {}, []
        kept = json.loads(layout.zero_shot.read_text())
        return kept["evaluation"], kept["answers"]
    evaluation, answers = measure()
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.zero_shot, json.dumps({"evaluation": evaluation, "answers": answers}) + "\n")
    return evaluation, answers


def run(config: RunConfig, on_eval: Callable[[int, dict], None] | None = None, validate: bool = False) -> dict[str, Any]:
    """Train and evaluate as `config` says; returns the summary numbers.

    Cheap checks (the output folder, the data and its split) run before the model is loaded.

    Args:
        config: the run's settings (e.g. from `load_run_config`).
        on_eval: called with ``(step, {"loss": validation loss})`` at each ``training.eval_every``; what it
            raises ends the run (a sweep's pruner).
        validate: also evaluate the fine-tuned model on the validation split (a sweep's objective).

    Returns:
        On the main process ``{"before", "after", "trainable", "seconds", "steps"}``: the zero-shot evaluation (on
        resume the one the run kept in ``zero_shot.json``, else empty), the fine-tuned one, the trainable parameter
        count, the training time and the steps trained;
        with early stopping ``"early_stopping"`` (best step and loss, whether it stopped); with `validate`
        ``"validation"``: the fine-tuned evaluation on the validation split; ``{}`` on other processes.

    Raises:
        TrainingOutputError: ``training.output_dir`` is a file, or holds an earlier run and ``training.resume`` is false.
        DataError: the data cannot be read or split.
        LoraConfigError: the training split is smaller than one batch, or the LoRA or PLoRA settings do not fit.
        ModelNotFoundError: the model is neither embedded nor a local directory.
        TargetModuleError: the method's ``target_modules`` or ``modules_to_save`` do not fit the model.
        UnsupportedModelError: the method is not available for the model (e.g. prefix tuning on an encoder).
        UnsupportedModelError: a multiple-choice task on a model that returns no key/value cache.
        ResumeError: a resumed run's checkpoint belongs to other settings or is damaged.
        TrainingDivergedError: the loss or the gradients became NaN or infinite.
    """
    from ..core.lora_model import LoraModel
    from . import base_models, data
    from .tasks import task_for
    from .trainer import Trainer

    layout = RunLayout(config.training.output_dir)
    check_output_dir(config.training)  # before minutes of loading and zero-shot evaluation
    _check_packing(config)
    examples = data.load_examples(config.data.source)
    task = task_for(config.model.task, examples, config.data.train_on)
    splits = data.split_examples(examples, config.data.seed, size_of(config.data.test_size), size_of(config.data.validation_size),
                                 config.data.max_train)
    if len(splits.train) < config.training.batch_size:
        raise LoraConfigError(
            f"the training split has {len(splits.train)} items, fewer than one batch of training.batch_size="
            f"{config.training.batch_size}: lower the batch size or the test/validation sizes."
        )
    check_early_stopping(config.training.early_stopping_patience, bool(splits.validation))
    model, tokenizer = base_models.load(config.model.name, task.model_task, task.num_labels, getattr(torch, config.model.dtype),
                                        config.model.quantization)
    sizes = config.training.eval_batch_size, config.training.max_length
    samples = splits.test[:SAMPLES]
    before, answers_before = _zero_shot(layout, config.training.resume, lambda: (
        task.evaluate(model, tokenizer, splits.test, *sizes), task.sample_answers(model, tokenizer, samples)))
    torch.manual_seed(config.training.seed)  # the adapter's init is part of the run: seed it
    items = task.items(tokenizer, splits.train, config.training.max_length)
    adapted = _adapted_model(model, tokenizer, config, items, task)
    eval_fn = None
    if splits.validation:
        eval_fn = lambda: {"loss": task.validation_loss(adapted, tokenizer, splits.validation, *sizes)}  # noqa: E731
    plora = None
    if config.training.method == "plora":
        from ..methods.plora.periodic import PeriodicLoRA

        plora = PeriodicLoRA(adapted, config.plora, history_dir=layout.plora_stages, seed=config.training.seed)
    settings = {"model": dataclasses.asdict(config.model), "data": dataclasses.asdict(config.data), "method": config.training.method}
    if config.training.method == "lst":  # the other methods' configs are recorded by the trainer
        settings["lst"] = dataclasses.asdict(config.lst)
    if plora is not None:
        settings["plora"] = dataclasses.asdict(config.plora)
    objective = _objective(config, task, adapted, items, tokenizer.pad_token_id)
    trainer = Trainer(adapted, items, config.training, tokenizer.pad_token_id, eval_fn, objective, plora=plora,
                      settings=settings, on_eval=on_eval)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    validation = {}
    if trainer.sharded or trainer.is_main:  # a sharded base answers only with every process taking part
        with trainer.precision.autocast():
            after = task.evaluate(adapted, tokenizer, splits.test, *sizes)
            answers_after = task.sample_answers(adapted, tokenizer, samples)
            if validate and splits.validation:
                validation = task.evaluate(adapted, tokenizer, splits.validation, *sizes)
                validation["loss"] = task.validation_loss(adapted, tokenizer, splits.validation, *sizes)
    trainer.finish()
    if not trainer.is_main:
        return {}
    adapted.save_pretrained(layout.adapter)
    if isinstance(adapted, LoraModel) and any(layer.initial_factors for _, layer in adapted.lora_layers()):  # PiSSA/MiLoRA
        from ..methods.residual import export_plain_lora

        export_plain_lora(adapted, layout.adapter_for_original_base)
    if plora is not None and plora.stages:  # the live adapter only fits the unloaded-into base
        from ..methods.plora.export import export_plora

        export_plora(layout.root, layout.adapter_for_original_base)
    history = [json.loads(line) for line in layout.metrics.read_text().splitlines()]
    _plot_losses(history, layout.loss_plot, task.loss_unit)
    trainable, total = adapted.get_nb_trainable_parameters()
    table = _summary(config, before, after, trainable, total, seconds, plora, trainer)
    table += "\n\n" + _sample_answers(samples, answers_before, answers_after)
    atomic_write_text(layout.summary, table + "\n")
    atomic_write_text(layout.config, yaml.safe_dump(config.to_dict(), sort_keys=False))
    print("\n" + table)
    result = {"before": before, "after": after, "trainable": trainable, "seconds": seconds, "steps": trainer.step}
    if trainer.early_stopping is not None:
        result["early_stopping"] = trainer.early_stopping.state_dict()
    return result | ({"validation": validation} if validate else {})


