"""`lorakit hub build`: a LoraHub module library, one ordinary training run per task.

Each module is a `recipe.run` into ``LIBRARY/<task>/`` (checkpoints, resume, summary as any run), stopped on
its validation loss (``training.early_stopping_patience``, the best evaluation's adapter kept). A finished
module (``hub_module.json`` beside its run) is skipped and keeps its adapter, not its checkpoints (unless asked:
they exist to resume, and 24 modules of a 135M model leave ~5 GB of them), an interrupted one is resumed from its
last checkpoint, and
the index (``library.json``, see `lorakit.methods.lorahub.library`) is rewritten after every module, so a
killed build leaves a usable library of the modules it finished.

With ``workers`` > 1 the modules train in that many processes at once (`lorakit.training.workers`), each on its
share of the cores, its output in ``<module>/train.log``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import yaml

from ..core.atomic import atomic_write_text
from ..core.errors import LoraConfigError
from ..core.plotting import pyplot, save_png
from ..core.run_layout import RunLayout
from ..methods.lorahub.library import INDEX
from .data import BIGBENCH_PREFIX, load_examples
from .recipe import load_run_config
from .settings import RunConfig
from .workers import check_worker_count, run_in_workers

__all__ = ["HUB_DEFAULTS", "MODULE_RECORD", "build_library", "module_folder", "read_tasks"]

# The LoraHub paper's module shape (r=16 on q/v, Sec. 4.1) and a cap of 1000 steps that early stopping ends sooner;
# the user's config file and overrides come after these.
HUB_DEFAULTS = (
    "lora.r=16", "lora.lora_alpha=32", "lora.target_modules=[q_proj, v_proj]", "lora.lora_dropout=0.05",
    "training.steps=1000", "training.eval_every=25", "training.save_every=25", "training.early_stopping_patience=3",
    "training.max_length=256", "data.test_size=50", "data.validation_size=50",
)
MODULE_RECORD = "hub_module.json"  # in a module's run folder once it is finished
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_tasks(tasks: str | os.PathLike | Sequence[str]) -> list[str]:
    """Data sources from a task list: a file with one per line (``#`` comments), a comma-separated string, or a list.

    A bare name means a BIG-bench task (``navigate`` -> ``bigbench:navigate``); ``bigbench:...``, data files and
    ``save_to_disk`` folders stay as they are.

    Args:
        tasks: the list, or a file holding it.

    Returns:
        The sources, in order.

    Raises:
        LoraConfigError: no task, or one named twice.

    Example:
        >>> read_tasks("navigate, logical_deduction/three_objects")
        ['bigbench:navigate', 'bigbench:logical_deduction/three_objects']
    """
    if isinstance(tasks, (str, os.PathLike)):
        path = Path(tasks)
        text = path.read_text(encoding="utf-8") if path.is_file() else str(tasks).replace(",", "\n")
        tasks = [line.split("#")[0].strip() for line in text.splitlines()]
    names = [task.strip() for task in tasks if task.strip()]
    is_local = lambda name: Path(name).suffix in DATA_SUFFIXES or Path(name).is_dir()  # noqa: E731
    sources = [name if name.startswith(BIGBENCH_PREFIX) or is_local(name) else BIGBENCH_PREFIX + name for name in names]
    if not sources:
        raise LoraConfigError("--tasks names no task: give a comma-separated list or a file with one task per line.")
    twice = sorted({s for s in sources if sources.count(s) > 1})
    if twice:
        raise LoraConfigError(f"--tasks names {twice[0]} more than once: each task gets one module.")
    return sources


def module_folder(source: str) -> str:
    """The library sub-folder of a task's module: its name with path separators as dashes.

    Args:
        source: a data source (``bigbench:...`` or a file).

    Returns:
        A folder name, e.g. ``logical_deduction-three_objects``.
    """
    name = source[len(BIGBENCH_PREFIX):] if source.startswith(BIGBENCH_PREFIX) else Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "task"


def _module_configs(sources: list[str], out: Path, config_path, overrides: Sequence[str]) -> list[RunConfig]:
    """Every module's run config, all checked before anything trains."""
    folders = [module_folder(source) for source in sources]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise LoraConfigError(f"two tasks would share the library folder {clash[0]!r}: rename one of their data files.")
    configs = []
    for source, folder in zip(sources, folders):
        config = load_run_config(config_path, [*HUB_DEFAULTS, *overrides, f"data.source={source}", f"training.output_dir={out / folder}"])
        configs.append(config)
    for source in sources:  # a missing task or a malformed file is named now, not after hours of other modules
        load_examples(source)
    first = configs[0]
    if first.training.method != "lora" or first.model.task != "causal-lm":
        raise LoraConfigError("LoraHub composes LoRA modules of a causal LM: build the library with training.method: lora "
                              "and model.task: causal-lm.")
    return configs


def _comparable(config: dict) -> dict:
    """The settings that make a module what it is: not where it lives (a library may be moved) nor how it resumed."""
    return config | {"training": {k: v for k, v in config["training"].items() if k not in ("resume", "output_dir")}}


def _finished(config: RunConfig) -> dict | None:
    """A finished module's record, or None; a module finished with other settings is refused."""
    folder = Path(config.training.output_dir)
    if not (folder / MODULE_RECORD).is_file():
        return None
    built = yaml.safe_load(RunLayout(folder).config.read_text())
    if _comparable(built) != _comparable(config.to_dict()):
        raise LoraConfigError(f"{folder} is a module built with other settings: build into another --out, or delete that "
                              "folder to rebuild it.")
    return json.loads((folder / MODULE_RECORD).read_text())


def _train_module(config: RunConfig, out: Path, keep_checkpoints: bool) -> dict:
    """Train (or resume) one module, write its record, then drop its checkpoints unless `keep_checkpoints`."""
    from .recipe import run

    layout = RunLayout(config.training.output_dir)
    if layout.holds_earlier_run():
        config.training.resume = True
    result = run(config)
    stopping = result.get("early_stopping")
    evaluations = [json.loads(line) for line in layout.metrics.read_text().splitlines()]
    losses = [m["eval_loss"] for m in evaluations if "eval_loss" in m]
    record = {
        "task": config.data.source, "folder": layout.root.name, "adapter": str(layout.adapter.relative_to(out)),
        "steps": result["steps"], "best_step": stopping["best_step"] if stopping else result["steps"],
        "stopped_early": bool(stopping and stopping["stopped"]),
        "validation_loss": stopping["best_loss"] if stopping else (losses[-1] if losses else None),
        "accuracy_before": result["before"].get("accuracy"), "accuracy_after": result["after"]["accuracy"],
        "seconds": result["seconds"],
    }
    atomic_write_text(layout.root / MODULE_RECORD, json.dumps(record, indent=1) + "\n")
    if not keep_checkpoints:  # after the record: a kill in between leaves a finished module with checkpoints, never one without
        shutil.rmtree(layout.checkpoints, ignore_errors=True)
    return record


def _plot(records: list[dict], path: Path) -> None:
    plt = pyplot()

    names = [r["folder"] for r in records]
    figure, axis = plt.subplots(figsize=(8, 1.5 + 0.3 * len(records)))
    positions = range(len(records))
    axis.barh([p + 0.2 for p in positions], [r["accuracy_before"] or 0 for r in records], height=0.4, label="before (base model)")
    axis.barh([p - 0.2 for p in positions], [r["accuracy_after"] for r in records], height=0.4, label="after (its module)")
    axis.set_yticks(list(positions), names)
    axis.invert_yaxis()
    axis.set_xlabel("own-task test accuracy")
    axis.set_xlim(0, 1)
    axis.legend(loc="lower right")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    save_png(figure, path, dpi=110)


def _train_job(job: tuple[int, RunConfig, Path, bool]) -> tuple[int, dict]:
    """One module in a worker process (one per module), its output into ``<module>/train.log`` for the process's
    life: a progress bar closed after a failure still writes there."""
    index, config, out, keep_checkpoints = job
    folder = Path(config.training.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(folder / "train.log", "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    return index, _train_module(config, out, keep_checkpoints)


def _train_in_workers(jobs: list[tuple[int, RunConfig, Path, bool]], workers: int, done) -> None:
    """Train `jobs` in `workers` processes (`run_in_workers`) and call ``done(index, record)`` as each finishes; the
    first failure stops the others (their checkpoints stay to resume)."""
    from tqdm import tqdm

    results = run_in_workers(_train_job, jobs, workers)
    with closing(results), tqdm(total=len(jobs), desc=f"modules ({workers} workers)") as bar:  # bar closed before an error prints
        for index, record in results:
            done(index, record)
            bar.update()


def build_library(tasks: str | os.PathLike | Sequence[str], out: str | os.PathLike, config_path: str | os.PathLike | None = None,
                  overrides: Sequence[str] = (), keep_checkpoints: bool = False, workers: int = 1) -> list[dict]:
    """Train one LoRA module per task into the library folder `out` and index it.

    Args:
        tasks: the tasks (see `read_tasks`).
        out: the library folder.
        config_path: a ``lorakit train`` YAML file for every module (default: the embedded defaults), applied after
            `HUB_DEFAULTS`.
        overrides: ``section.key=value`` settings for every module, applied last.
        keep_checkpoints: keep a finished module's checkpoints (by default only its adapter stays: they exist to resume).
        workers: modules trained at once, each in its own process on its share of the cores (see the module's notes).

    Returns:
        One record per module, in task order (what ``library.json`` lists).

    Raises:
        LoraConfigError: a bad task list or setting, a method other than LoRA on a causal LM, or a finished module built
            with other settings (all found before anything trains).
        DataError: a task's data cannot be read (found before anything trains).
        ModelNotFoundError, TrainingDivergedError: as `lorakit.training.recipe.run`.
    """
    check_worker_count(workers)
    out = Path(out)
    configs = _module_configs(read_tasks(tasks), out, config_path, overrides)
    records = dict(enumerate(_finished(config) for config in configs))  # all checked before one trains

    def write_index() -> None:
        finished = [records[i] for i in sorted(records) if records[i] is not None]  # task order
        atomic_write_text(out / INDEX, json.dumps({"settings": list(overrides), "modules": finished}, indent=1) + "\n")

    def done(index: int, record: dict) -> None:
        records[index] = record
        write_index()

    if any(record is not None for record in records.values()):
        write_index()  # the finished modules, in this task list's order, before any other trains
    jobs = [(i, config, out, keep_checkpoints) for i, config in enumerate(configs) if records[i] is None]
    if workers > 1 and len(jobs) > 1:
        _train_in_workers(jobs, workers, done)
    else:
        for index, config, _, _ in jobs:
            done(index, _train_module(config, out, keep_checkpoints))
    ordered = [records[i] for i in range(len(configs))]
    _plot(ordered, out / "library.png")
    return ordered
