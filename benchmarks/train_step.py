"""LoRA training-step speed and memory: lorakit vs HF PEFT vs the frozen-model floor, in one run.

Model: a SmolLM2-135M-shaped Llama with random weights (hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152), batch 4x128, r=16 on every linear layer. Timings are interleaved
(floor, PEFT, lorakit, floor, ...) so machine noise hits all three alike; medians are reported.

* floor: frozen base, forward + backward to the activations (what any adapter must at least pay)
* step: forward + backward + AdamW step on the adapter
* inference: forward of the unmerged adapter under no_grad
* training memory: peak memory of 3 steps above the built model, each kind in a fresh process
  (RSS sampled every millisecond on CPU; torch.cuda.max_memory_allocated on a GPU)

    python benchmarks/train_step.py [--repeats 7] [--layers 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import in_fresh_process, peak_of_steps  # noqa: E402

SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(kind: str, layers: int, device: str):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(SHAPE | {"num_hidden_layers": layers}))).to(device)
    model.train()
    if kind == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, None
    if kind == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        import lorakit

        model = lorakit.get_lora_model(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def batch(device: str) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(0)).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids).logits.float().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def training_memory(kind: str, layers: int, device: str) -> float:
    """Peak memory (MiB) of 3 training steps above the built model, for `kind` alone.

    CPU: RSS sampled every millisecond by a thread (``ru_maxrss`` would report model construction);
    GPU: ``torch.cuda.max_memory_allocated`` after a reset.
    """
    model, optimizer = build(kind, layers, device)
    ids = batch(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        for _ in range(3):
            step(model, optimizer, ids)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    return peak_of_steps(lambda: step(model, optimizer, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, layers {args.layers}")

    ids = batch(args.device)
    kinds = ["floor", "peft", "lorakit"]
    models = {k: build(k, args.layers, args.device) for k in kinds}
    times = {k: [] for k in kinds}
    inference = {k: [] for k in ("peft", "lorakit")}
    for m, o in models.values():  # warm-up
        step(m, o, ids)
    for _ in range(args.repeats):
        for kind in kinds:
            model, optimizer = models[kind]
            times[kind].append(timed(lambda: step(model, optimizer, ids), args.device))
        for kind in inference:
            model = models[kind][0]
            with torch.no_grad():
                inference[kind].append(timed(lambda: model(input_ids=ids), args.device))

    med = {k: statistics.median(v) for k, v in times.items()}
    inf = {k: statistics.median(v) for k, v in inference.items()}
    print(f"\nmedian of {args.repeats} interleaved runs, batch 4x128, r=16 on all linear layers")
    print("| what | seconds | vs floor | vs PEFT |\n|---|---|---|---|")
    for kind in kinds:
        print(f"| {kind} step | {med[kind]:.3f} | {med[kind] / med['floor']:.3f}x | {med[kind] / med['peft']:.3f}x |")
    for kind in inference:
        print(f"| {kind} inference (unmerged) | {inf[kind]:.3f} | | {inf[kind] / inf['peft']:.3f}x |")
    print(f"\nlorakit step / PEFT step = {med['lorakit'] / med['peft']:.3f} (target <= 0.85)")
    print(f"lorakit step / floor     = {med['lorakit'] / med['floor']:.3f} (target <= 1.15)")
    if not args.no_memory:
        del models
        peak = {k: in_fresh_process("train_step", "training_memory", k, args.layers, args.device) for k in kinds}
        print("\ntraining memory above the model (MiB, peak over 3 steps, fresh process each):")
        for kind in kinds:
            print(f"  {kind:8s} {peak[kind]:9.1f}")
        print(f"lorakit peak / PEFT peak = {peak['lorakit'] / peak['peft']:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
