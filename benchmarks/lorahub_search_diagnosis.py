"""Why LoraHub misses a module that carries the task: the search, or the objective?

The positive controls of `benchmarks/lorahub_study.py` hold out a task whose own module is in the library (tested
on the 50 items `hub build` held back from it). The paper's search (NGOpt, budget 40, weights from 0) gave that
module a weight of about 0.5-0.7 and kept little of its gain on disambiguation_qa. For each control and seed this
script scores, on the same 5 examples, the objective the search minimises (few-shot loss + λ·mean|w|) and the
test accuracy at:

- the weights the paper's search found;
- the task's own module alone (weight 1, the rest 0);
- the found weights with the own module's weight set to 1;
- the own module alone at the weight the search gave it.

If the own module alone has the lower objective, the objective points the right way and the search stopped short
of it. Then the paper's search with 5x the budget (200 evaluations) on one control and seed: does budget alone get
there, and at what cost, next to starting the search at the best single module (`start="best-single"`, the
study's own rows)?

On the ten held-out tasks the weights the paper's search returned are about 0.5 on two or three modules and near 0
elsewhere, and the large ones sit on the first modules of the list more often than chance. So last: where in the
list the largest weight sits, over every held-out row (NGOpt and CMA-ES), and the paper's search re-run on the same
5 examples and modules in reverse order (ORDER_RUNS): do the large weights follow the modules or the positions?

    python benchmarks/lorahub_search_diagnosis.py [--seeds 0 1 2]   # reads the study's kept rows; ~1 h on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from lorakit import base_models, lorahub
from lorakit.core.atomic import atomic_write_text
from lorakit.training.evaluate import evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lorahub_study as study  # noqa: E402
from _measure import cached_json  # noqa: E402

LAM = lorahub.DEFAULTS["lam"]
LONG_BUDGET, LONG_RUN = 200, ("disambiguation_qa", 0)  # the control the paper's search did worst on, seed 0
ORDER_RUNS = [("social_iqa", 0), ("riddle_sense", 0), ("penguins_in_a_table", 0), ("general_knowledge", 0)]


def probe_points(task: str, seed: int) -> dict:
    """Objective and test accuracy at the four weight vectors of the module docstring."""
    found = study.cached(study.RESULTS, task, "LoraHub NGOpt", seed, study.seed_modules(seed, task))["weights"]
    names = list(found)
    own = names.index(task)
    weights = torch.tensor([found[n] for n in names])  # (N,)
    alone = torch.zeros(len(names))
    alone[own] = 1.0
    own_to_one = weights.clone()
    own_to_one[own] = 1.0
    points = {"found by the search": weights, "own module alone": alone, "found, own module's weight -> 1": own_to_one,
              "own module alone at the found weight": alone * weights[own]}
    test, shots = study.test_and_shots(task, seed, study.RESULTS)
    tokenizer = base_models.load(study.MODEL)[1]
    modules = study.adapters(study.RESULTS, "qv", names)
    with lorahub.HubObjective(study.fresh_base(), lorahub.load_modules(modules), shots, tokenizer, population=len(points)) as objective:
        losses = objective.population_loss(torch.stack(list(points.values())))
    rows = {}
    for (name, point), loss in zip(points.items(), losses):
        model = study.with_module(lorahub.compose(modules, point.tolist()))
        rows[name] = {"few_shot_loss": loss, "objective": lorahub.penalised_objective(loss, point, LAM),
                      "own_weight": float(point[own]), "accuracy": evaluate(model, tokenizer, test)["accuracy"]}
    return rows


def paper_search(task: str, seed: int, names: list[str], budget: int = lorahub.DEFAULTS["budget"]) -> dict:
    """The paper's search (NGOpt from 0) over the modules `names`, in that order, on the seed's 5 examples of `task`."""
    test, shots = study.test_and_shots(task, seed, study.RESULTS)
    tokenizer = base_models.load(study.MODEL)[1]
    started = time.perf_counter()
    result = lorahub.learn(study.fresh_base(), study.adapters(study.RESULTS, "qv", names), shots, tokenizer, budget=budget,
                           seed=seed, merge=True, progress=False)
    seconds = time.perf_counter() - started
    return {"weights": dict(zip(names, result.weights)), "objective": min(result.losses), "seconds": seconds,
            "accuracy": evaluate(result.model, tokenizer, test)["accuracy"]}


def long_search(task: str, seed: int) -> dict:
    """The paper's search with LONG_BUDGET evaluations instead of 40."""
    row = paper_search(task, seed, study.seed_modules(seed, task), LONG_BUDGET)
    return row | {"own_weight": row["weights"][task]}


def reversed_order(task: str, seed: int) -> dict:
    """The paper's search on a held-out task's 20 modules and 5 examples, listed in reverse."""
    return paper_search(task, seed, study.seed_modules(seed)[::-1])


def largest(weights: dict[str, float], count: int = 2) -> list[tuple[int, str, float]]:
    """(position in the list, module, weight) of the `count` weights largest in magnitude."""
    ranked = sorted(enumerate(weights.items()), key=lambda item: -abs(item[1][1]))[:count]
    return [(position, name, weight) for position, (name, weight) in ranked]


def position_lines(seeds: list[int]) -> list[str]:
    """Where in the module list the largest weight of each held-out row sits (rows the study kept)."""
    lines = ["| search | rows | largest weight at position 1 | at 2 | at 3-20 | chance at 1 |", "|---|---|---|---|---|---|"]
    for method in ("LoraHub NGOpt", "LoraHub CMA-ES"):
        rows = [row for task in study.HELD_OUT for seed in seeds
                if (row := study.kept(study.RESULTS, task, method, seed, study.seed_modules(seed))) is not None]
        first = [largest(row["weights"], 1)[0][0] for row in rows]
        lines.append(f"| {method} | {len(rows)} | {first.count(0)} | {first.count(1)} | {sum(p > 1 for p in first)} | "
                     f"{len(rows) / study.MODULES:.1f} |")
    return lines


def order_lines(folder) -> list[str]:
    """The paper's search on the modules in the study's order and in reverse: the two largest weights of each."""
    lines = ["| task | seed | modules as listed: two largest (position) | test accuracy | listed in reverse: two largest "
             "(position) | test accuracy |", "|---|---|---|---|---|---|"]

    def cell(weights: dict[str, float]) -> str:
        return ", ".join(f"{name} {weight:+.2f} ({position + 1})" for position, name, weight in largest(weights))

    for task, seed in ORDER_RUNS:
        listed = study.cached(study.RESULTS, task, "LoraHub NGOpt", seed, study.seed_modules(seed))
        reverse = cached_json(folder / f"{task}-seed{seed}-reversed.json", {"modules": study.seed_modules(seed)[::-1]},
                              lambda: reversed_order(task, seed))
        lines.append(f"| {task} | {seed} | {cell(listed['weights'])} | {listed['accuracy']:.2f} | "
                     f"{cell(reverse['weights'])} | {reverse['accuracy']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    folder = study.RESULTS / "diagnosis"
    lines = ["# LoraHub's positive control: the search or the objective? (benchmarks/lorahub_search_diagnosis.py)", "",
             "| task | seed | weights | own module's weight | few-shot loss | objective | test accuracy |", "|---|---|---|---|---|---|---|"]
    for task in study.POSITIVE_CONTROLS:
        for seed in args.seeds:
            rows = cached_json(folder / f"{task}-seed{seed}.json", {"lam": LAM}, lambda: probe_points(task, seed))
            lines += [f"| {task} | {seed} | {name} | {row['own_weight']:.2f} | {row['few_shot_loss']:.3f} | {row['objective']:.3f} | "
                      f"{row['accuracy']:.2f} |" for name, row in rows.items() if name != "settings"]
    task, seed = LONG_RUN
    paper = study.cached(study.RESULTS, task, "LoraHub NGOpt", seed, study.seed_modules(seed, task))
    warm = study.cached(study.RESULTS, task, "LoraHub NGOpt (best-single start)", seed, study.seed_modules(seed, task))
    long = cached_json(folder / f"{task}-seed{seed}-budget{LONG_BUDGET}.json", {"budget": LONG_BUDGET}, lambda: long_search(task, seed))
    lines += ["", f"{task}, seed {seed}: how far the search gets", "", "| search | evaluations | best objective | own module's weight | "
              "test accuracy | seconds |", "|---|---|---|---|---|---|"]
    for name, evaluations, row in (("NGOpt from 0 (the paper)", 40, paper), (f"NGOpt from 0, budget {LONG_BUDGET}", LONG_BUDGET, long),
                                   ("NGOpt from the best single module", f"{len(warm['weights'])} + 40", warm)):
        objective = row.get("objective", row.get("best_loss"))
        weight = row["own_weight"] if "own_weight" in row else row["weights"][task]
        lines.append(f"| {name} | {evaluations} | {objective:.3f} | {weight:.2f} | {row['accuracy']:.2f} | {row['seconds']:.0f} |")
    lines += ["", "Held-out tasks: where the largest weight sits in the list of 20 modules", ""] + position_lines(args.seeds)
    lines += ["", "The paper's search on the same modules and 5 examples, listed in reverse", ""] + order_lines(folder)
    atomic_write_text(study.RESULTS / "diagnosis.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
