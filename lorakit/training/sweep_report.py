"""A sweep's report: ``results.md`` (every finished trial, best first), ``best/`` (the best trial's adapter) and
plots (optimisation history, parameter importances, slices) as PNG, rebuilt from the study at any time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.atomic import atomic_write_text, staged_directory
from ..core.errors import LoraConfigError
from ..core.plotting import pyplot, save_png

__all__ = ["load_study", "write_report"]


def load_study(output_dir: str | Path, study_name: str | None = None, storage: str | None = None):
    """An existing sweep's study (to rebuild its report).

    Args:
        output_dir: the sweep's output folder.
        study_name: the study's name (default: the folder's name).
        storage: its Optuna RDB URL (default: ``output_dir/study.db``).

    Returns:
        The ``optuna.Study``.

    Raises:
        LoraConfigError: there is no such study.
    """
    import optuna

    output_dir = Path(output_dir)
    if storage is None:
        if not (output_dir / "study.db").is_file():
            raise LoraConfigError(f"{output_dir} holds no study.db: give the sweep's output_dir, or --storage and --study.")
        storage = f"sqlite:///{(output_dir / 'study.db').resolve()}"
    name = study_name or output_dir.resolve().name
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise LoraConfigError(f"no study {name!r} in {storage}; it holds {names}: pass --study.") from None


def _ranked(study) -> list:
    """Complete trials best first, then pruned ones (by their last reported value), best first too."""
    import optuna

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))
    pruned.sort(key=lambda t: (t.user_attrs.get("last_validation_loss", float("inf")), t.number))
    return complete + pruned


def _cell(value) -> str:
    """A parameter as a table cell: floats to 4 significant digits (0.15, not 0.15000000000000002)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(study) -> str:
    trials = _ranked(study)
    keys = sorted({key for t in trials for key in t.params})
    sweep = json.loads(study.user_attrs.get("sweep", "{}"))
    objective = sweep.get("objective", "value")
    lines = [f"# Sweep {study.study_name}: {objective} ({study.direction.name.lower()})", "",
             f"{sum(t.state.name == 'COMPLETE' for t in trials)} complete and {sum(t.state.name == 'PRUNED' for t in trials)} "
             f"pruned trials; failed or surplus trials are left out.", "",
             "| trial | state | " + " | ".join([objective, "validation loss", "test accuracy", "steps", "seconds", *keys]) + " |",
             "|" + "---|" * (7 + len(keys))]
    for t in trials:
        value = f"{t.value:.4f}" if t.state.name == "COMPLETE" else ""  # a pruned trial's value is its last report
        loss = t.user_attrs.get("validation_loss", t.user_attrs.get("last_validation_loss"))
        test = t.user_attrs.get("test_accuracy")
        steps = max(t.intermediate_values) if t.intermediate_values else ""
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration else ""
        cells = [str(t.number), t.state.name.lower(), value, "" if loss is None else f"{loss:.4f}",
                 "" if test is None else f"{test:.3f}", str(steps), seconds]
        cells += [_cell(t.params.get(key, "")) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(study, output_dir: Path) -> list[str]:
    """Optuna's matplotlib plots as PNG; a plot the study cannot have yet (e.g. importances of one trial) is skipped."""
    pyplot()  # the file-only backend before optuna draws
    import optuna.visualization.matplotlib as plots

    written = []
    for name, plot in [("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("slices", plots.plot_slice)]:
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.set_size_inches(max(6.0, figure.get_size_inches()[0]), 4.5)
        figure.tight_layout()
        path = output_dir / f"{name}.png"
        save_png(figure, path, dpi=110)
        written.append(path.name)
    return written


def write_report(study, output_dir: str | Path) -> Path:
    """Write ``results.md``, ``best/`` and the plots into `output_dir`.

    Args:
        study: the sweep's ``optuna.Study``.
        output_dir: the sweep's output folder.

    Returns:
        The path of ``results.md``.
    """
    import warnings

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore")
        written = _plots(study, output_dir)
    table = _table(study)
    ranked = [t for t in _ranked(study) if t.state.name == "COMPLETE"]
    if ranked:
        best = Path(ranked[0].user_attrs["folder"])
        with staged_directory(output_dir / "best") as staging:
            shutil.copytree(best / "adapter", staging, dirs_exist_ok=True)
            shutil.copy2(best / "summary.md", staging / "summary.md")
        table += f"\nBest: trial {ranked[0].number}; its adapter is in `best/` (the run: `{best}`).\n"
    if written:
        table += "\nPlots: " + ", ".join(f"`{name}`" for name in written) + ".\n"
    path = output_dir / "results.md"
    atomic_write_text(path, table)
    return path
