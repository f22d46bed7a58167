"""Hyper-parameter sweeps on Optuna (Akiba et al. 2019, "Optuna: A Next-generation Hyperparameter Optimization
Framework"): each trial an ordinary training run, the study in a database that several processes share.

A sweep file names a base recipe (any ``lorakit train`` config), a search space over its keys
(`SearchSpace`), the objective (validation accuracy or loss), the sampler (TPE, random, grid) and the pruner
(median or none)::

    base: hyperbaton.yaml          # a recipe file (relative to the sweep file), or the recipe inline
    output_dir: runs/sweep
    objective: validation_accuracy # | validation_loss
    sampler: tpe                   # | random | grid
    pruner: median                 # | none: stops trials whose validation loss trails the median
    trials: 24
    space:
      lora.r: {choices: [4, 8, 16, 32]}
      training.lr: {low: 1.0e-4, high: 3.0e-3, log: true}

Trials run in ``output_dir/trials/trial-NNNN`` (summary, metrics, adapter). The study lives in SQLite
(``output_dir/study.db``) or any Optuna RDB URL; processes keep a heartbeat, so a trial whose process died
is marked failed and its settings retried, and ``trials`` counts the study's finished trials over all the
processes that share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from ..core.errors import LoraConfigError, TrainingDivergedError, TrainingOutputError
from .search_space import SearchSpace, SearchSpaceError, yaml_text

__all__ = ["SweepConfig", "grid", "load_sweep", "open_study", "run_sweep"]

OBJECTIVES = {"validation_accuracy": "maximize", "validation_loss": "minimize"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")


@dataclasses.dataclass
class SweepConfig:
    """A sweep: the base recipe, the search space and how to search it.

    Attributes:
        space: the search space, ``{recipe key: {choices: [...]} | {low, high[, log | step]}}``.
        base: the base recipe file (None: the embedded defaults).
        base_overrides: ``section.key=value`` settings on top of the base (an inline ``base:`` mapping).
        output_dir: where the study, the trials and the report go.
        objective: ``validation_accuracy`` (maximised) or ``validation_loss`` (minimised).
        sampler: ``tpe``, ``random`` or ``grid`` (grid: every entry choices or an integer range).
        pruner: ``median`` or ``none``.
        pruner_startup_trials: finished trials before the median pruner may stop one.
        trials: finished (complete or pruned) trials the study should hold.
        seed: the sampler's seed (the first process of a study; each further one offsets it).
        heartbeat_seconds: how often a running trial says it is alive; silent for twice that, it counts as failed.
    """

    space: dict
    base: str | None = None
    base_overrides: list[str] = dataclasses.field(default_factory=list)
    output_dir: str = "runs/sweep"
    objective: str = "validation_accuracy"
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_startup_trials: int = 5
    trials: int = 20
    seed: int = 0
    heartbeat_seconds: int = 30

    @property
    def direction(self) -> str:
        """``"maximize"`` for validation accuracy, ``"minimize"`` for validation loss."""
        return OBJECTIVES[self.objective]


def _flatten(base: Mapping) -> list[str]:
    overrides = []
    for section, values in base.items():
        if not isinstance(values, Mapping):
            raise LoraConfigError(f"sweep base: section {section!r} must be a mapping of keys, not {values!r}.")
        overrides += [f"{section}.{key}={yaml_text(value)}" for key, value in values.items()]
    return overrides


def load_sweep(path: str | os.PathLike, trials: int | None = None) -> tuple[SweepConfig, SearchSpace]:
    """Read and check a sweep file: its keys, the base recipe, the search space (every value loads as a setting).

    Args:
        path: the sweep YAML file.
        trials: overrides the file's ``trials``.

    Returns:
        The sweep and its checked search space.

    Raises:
        LoraConfigError: an unknown sweep key (with the closest one), an unknown objective, sampler or pruner,
            ``trials`` < 1, a base recipe that does not load or has no validation split, or a grid over a
            continuous range.
        SearchSpaceError: a bad search space (see `SearchSpace`).
    """
    import difflib

    from .recipe import load_run_config

    path = Path(path)
    if not path.is_file():
        raise LoraConfigError(f"sweep file {str(path)!r} does not exist.")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise LoraConfigError(f"{path} must hold a mapping (base, space, objective, ...), not a {type(raw).__name__}.")
    fields = {f.name for f in dataclasses.fields(SweepConfig)} - {"base_overrides"}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1, cutoff=0.5)
            raise LoraConfigError(f"unknown sweep key {key!r}." + (f" Did you mean {close[0]!r}?" if close else f" Valid: {sorted(fields)}."))
    if "space" not in raw:
        raise SearchSpaceError(f"{path} has no `space:`; add one, e.g. `space: {{lora.r: {{choices: [4, 8, 16]}}}}`.")
    base = raw.pop("base", None)
    if isinstance(base, Mapping):
        raw["base_overrides"] = _flatten(base)
    elif base is not None:
        raw["base"] = str(path.parent / base)
    config = SweepConfig(**raw)
    if trials is not None:
        config.trials = trials
    for key, allowed in [("objective", list(OBJECTIVES)), ("sampler", SAMPLERS), ("pruner", PRUNERS)]:
        if getattr(config, key) not in allowed:
            raise LoraConfigError(f"sweep {key}={getattr(config, key)!r}: use one of {list(allowed)}.")
    for key in ("trials", "heartbeat_seconds", "pruner_startup_trials"):
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "pruner_startup_trials" else 1):
            raise LoraConfigError(f"sweep {key}={value!r}: use a positive integer.")
    recipe = load_run_config(config.base, config.base_overrides)
    if recipe.data.validation_size in (0, 0.0):
        raise LoraConfigError("the base recipe has data.validation_size: 0, but a sweep selects on the validation split: give it one.")
    space = SearchSpace(config.space, config.base, config.base_overrides)
    if config.sampler == "grid":
        grid(space)
    return config, space


def grid(space: SearchSpace) -> dict[str, list]:
    """Every value of each key, for Optuna's grid sampler.

    Args:
        space: the search space.

    Returns:
        ``{key: values}``.

    Raises:
        LoraConfigError: a key is a float range without ``step`` (a grid needs finitely many values).
    """
    values = {}
    for key, d in space.distributions.items():
        if hasattr(d, "choices"):
            values[key] = list(d.choices)
        elif d.step is not None:
            count = int(round((d.high - d.low) / d.step)) + 1
            values[key] = [d.low + i * d.step for i in range(count)]
        else:
            raise LoraConfigError(f"sampler: grid needs finitely many values, but {key} is a continuous range: give it "
                                  "choices or a step, or use sampler: tpe / random.")
    return values


def _storage(config: SweepConfig, url: str | None):
    import optuna

    if url is None:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(Path(config.output_dir) / 'study.db').resolve()}"
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # Optuna marks its heartbeat experimental; users need not read that each sweep
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=config.heartbeat_seconds,
                                          grace_period=2 * config.heartbeat_seconds, heartbeat_stale_trial_callback=retry)


def _worker_index(study, key: str) -> int:
    """This process's place among the processes that joined the study (0 for the first): each registers its
    start time, and places follow start times, so no two processes get the same place."""
    study.set_user_attr(f"worker {key}", time.time())
    joined = sorted((value, name) for name, value in study.user_attrs.items() if name.startswith("worker "))
    return [name for _, name in joined].index(f"worker {key}")


def _sampler(config: SweepConfig, space: SearchSpace, seed: int):
    import optuna

    if config.sampler == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=seed)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class _Surplus(Exception):
    """A trial asked for after the study had its trials (finished or running): not run."""


@contextlib.contextmanager
def _creation_lock(config: SweepConfig) -> Iterator[None]:
    """An exclusive lock (a file in the output folder) held while the study is created or loaded; processes on
    other machines share a server database, whose own transactions order them."""
    import fcntl

    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".study.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_study(config: SweepConfig, study_name: str | None = None, storage: str | None = None):
    """Create or load the sweep's study, refusing one that was made for other sweep settings.

    Args:
        config: the sweep.
        study_name: the study's name (default: the output folder's name).
        storage: an Optuna RDB URL (default: SQLite in ``output_dir/study.db``).

    Returns:
        The ``optuna.Study``.

    Raises:
        LoraConfigError: the study exists with another objective, base or search space.
        TrainingOutputError: ``output_dir/trials`` holds trial folders that this study did not write.
    """
    import optuna

    name = study_name or Path(config.output_dir).resolve().name
    recorded = json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k not in ("trials", "output_dir")}, sort_keys=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup_trials) if config.pruner == "median" else optuna.pruners.NopPruner()
    with _creation_lock(config):  # two processes creating one database's tables at once collide
        rdb = _storage(config, storage)
        _refuse_foreign_trials(rdb, name, config.output_dir)
        study = optuna.create_study(study_name=name, storage=rdb, direction=config.direction, pruner=pruner,
                                    load_if_exists=True)
        existing = study.user_attrs.get("sweep")
        if existing is None:
            study.set_user_attr("sweep", recorded)
    if existing is not None and existing != recorded:
        raise LoraConfigError(f"study {name!r} was made by a sweep with other settings (base, space, objective, sampler, seed); "
                              "sweep into another output_dir or pass another --study name.")
    return study


def _refuse_foreign_trials(storage, name: str, output_dir: str) -> None:
    """Trial folders are named by trial number: one the study never assigned would be overwritten or mixed in."""
    import optuna

    folders = [p for p in sorted((Path(output_dir) / "trials").glob("trial-*")) if p.is_dir() and any(p.iterdir())]
    known = set()  # read after listing the folders: a trial records its folder before creating it, so no race
    if folders and name in optuna.get_all_study_names(storage):
        known = {t.user_attrs.get("folder") for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)}
    foreign = [p for p in folders if str(p) not in known]
    if foreign:
        raise TrainingOutputError(f"{foreign[0]} holds files study {name!r} did not write (another study in the "
                                  "same output_dir, or its database replaced): move the folder away, or give the sweep "
                                  "another output_dir.")


def run_sweep(config: SweepConfig, space: SearchSpace, study_name: str | None = None, storage: str | None = None,
              report: bool = True):
    """Run trials until the study holds ``config.trials`` finished ones (with whatever other processes share it).

    Args:
        config: the sweep (from `load_sweep`).
        space: its search space.
        study_name: the study's name (default: the output folder's name).
        storage: an Optuna RDB URL (default: SQLite in ``output_dir/study.db``).
        report: write the results table, ``best/`` and the plots at the end (see `sweep_report.write_report`).

    Returns:
        The ``optuna.Study``.

    Raises:
        LoraConfigError: the study exists with other sweep settings.
        TrainingOutputError: ``output_dir/trials`` holds trial folders that this study did not write.
    """
    import optuna

    from .recipe import load_run_config, run

    study = open_study(config, study_name, storage)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    study.sampler = _sampler(config, space, config.seed + 1000 * _worker_index(study, worker))
    sign = 1.0 if config.direction == "minimize" else -1.0  # intermediate values in the objective's direction
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial) -> float:
        states = finished + (optuna.trial.TrialState.RUNNING,)
        ahead = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < trial.number]
        diverged = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)) if "diverged" in t.user_attrs]
        if len(ahead) >= config.trials or len(diverged) >= config.trials:  # enough trials, or a space that only diverges
            study.stop()
            raise _Surplus
        params = space.suggest(trial)
        folder = Path(config.output_dir) / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("folder", str(folder))
        run_config = load_run_config(config.base, [*config.base_overrides, *space.overrides(params), f"training.output_dir={folder}"])

        def prune(step: int, evaluation: dict) -> None:
            trial.set_user_attr("last_validation_loss", evaluation["loss"])
            trial.report(sign * evaluation["loss"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {evaluation['loss']:.4f} at step {step} trails the median")

        try:
            result = run(run_config, on_eval=prune, validate=True)
        except TrainingDivergedError as err:
            trial.set_user_attr("diverged", str(err))
            raise
        validation = result["validation"]
        trial.set_user_attr("validation_accuracy", validation["accuracy"])
        trial.set_user_attr("validation_loss", validation["loss"])
        trial.set_user_attr("test_accuracy", result["after"]["accuracy"])
        return validation["accuracy"] if config.objective == "validation_accuracy" else validation["loss"]

    stop = optuna.study.MaxTrialsCallback(config.trials, states=finished)
    if len(study.get_trials(deepcopy=False, states=finished)) < config.trials:
        # a diverging trial (too high a learning rate) is an outcome of the search: marked failed, the sweep goes on
        study.optimize(objective, callbacks=[stop], catch=(_Surplus, TrainingDivergedError), gc_after_trial=True)
    if report:
        from .sweep_report import write_report

        write_report(study, config.output_dir)
    return study
