"""IA3, prompt tuning, P-tuning and prefix tuning: lorakit's training step and memory vs HF PEFT's, in one run.

Model: the SmolLM2-135M-shaped Llama of `train_step.py` (random weights; --layers to shrink it), batch 4x128.
Each method at its usual settings (IA3 on k/v/down; 20 virtual tokens; P-tuning MLP hidden 128; prefix tuning
with projection, hidden 128), built the same way in both libraries. Timings are interleaved (floor, then
PEFT and lorakit per method, round after round) so machine noise hits all alike; medians of --repeats.

* floor: the frozen base, forward + backward to the input embeddings (what any method must at least pay;
  prompt methods also run 20 more positions, prefix tuning 20 more keys per layer)
* step: forward + backward + AdamW step on the method's parameters
* training memory: peak of 3 steps above the built model, each (library, method) in a fresh process

    python benchmarks/peft_methods.py [--repeats 5] [--layers 30]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import in_fresh_process, peak_of_steps  # noqa: E402
from train_step import SHAPE, batch, step, timed  # noqa: E402

METHODS = ["ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]


def configs(method: str):
    """(PEFT config, lorakit config) of one method at its usual settings."""
    import peft

    import lorakit

    if method == "ia3":
        kwargs = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        return peft.IA3Config(task_type="CAUSAL_LM", **kwargs), lorakit.IA3Config(**kwargs)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20), lorakit.PromptTuningConfig(num_virtual_tokens=20)
    if method == "p_tuning":
        kwargs = dict(num_virtual_tokens=20, encoder_hidden_size=128)
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", **kwargs), lorakit.PromptEncoderConfig(**kwargs)
    kwargs = dict(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128)
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs), lorakit.PrefixTuningConfig(**kwargs)


def build(library: str, method: str, layers: int):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(SHAPE | {"num_hidden_layers": layers})))
    model.train()
    if library == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, None
    peft_config, lorakit_config = configs(method)
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, peft_config)
    else:
        import lorakit

        model = lorakit.get_peft_model(model, lorakit_config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def training_memory(library: str, method: str, layers: int) -> float:
    """Peak RSS (MiB) of 3 training steps above the built model."""
    model, optimizer = build(library, method, layers)
    ids = batch("cpu")
    return peak_of_steps(lambda: step(model, optimizer, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, layers {args.layers}, batch 4x128")
    ids = batch("cpu")
    floor_model = build("floor", "", args.layers)
    models = {(library, method): build(library, method, args.layers) for method in args.methods for library in ("peft", "lorakit")}
    times: dict = {key: [] for key in models} | {("floor", ""): []}
    for model, optimizer in [floor_model, *models.values()]:  # warm-up
        step(model, optimizer, ids)
    for _ in range(args.repeats):
        times[("floor", "")].append(timed(functools.partial(step, *floor_model, ids), "cpu"))
        for key, (model, optimizer) in models.items():
            times[key].append(timed(functools.partial(step, model, optimizer, ids), "cpu"))
    median = {key: statistics.median(values) for key, values in times.items()}
    base = median[("floor", "")]
    print(f"\nmedian of {args.repeats} interleaved runs; floor step {base:.3f} s")
    print("| method | PEFT step (s) | lorakit step (s) | lorakit / PEFT | lorakit / floor |\n|---|---|---|---|---|")
    for method in args.methods:
        ours, theirs = median[("lorakit", method)], median[("peft", method)]
        print(f"| {method} | {theirs:.3f} | {ours:.3f} | {ours / theirs:.3f}x | {ours / base:.3f}x |")
    if args.no_memory:
        return
    del models, floor_model
    print("\ntraining memory above the model (MiB, peak of 3 steps, fresh process each):")
    print("| method | PEFT | lorakit | lorakit / PEFT |\n|---|---|---|---|")
    floor_mib = in_fresh_process("peft_methods", "training_memory", "floor", "", args.layers)
    for method in args.methods:
        ours = in_fresh_process("peft_methods", "training_memory", "lorakit", method, args.layers)
        theirs = in_fresh_process("peft_methods", "training_memory", "peft", method, args.layers)
        print(f"| {method} | {theirs:.0f} | {ours:.0f} | {ours / theirs:.3f}x |")
    print(f"(floor: {floor_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
