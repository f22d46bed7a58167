"""Mixed-adapter inference: 8 different adapters in one batch of 16 rows, lorakit vs HF PEFT, in one run.

Model: a SmolLM2-135M-shaped Llama with random weights (hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152); 8 adapters, r=16 on every linear layer, random non-zero factors,
loaded into both libraries from the same files. Batch 16 x `--seq` tokens, two rows per adapter.
Timings are interleaved (base, PEFT mixed, lorakit mixed, lorakit single, ...) and medians reported.

* base: the frozen model, no adapter (the floor)
* PEFT mixed: ``peft_model(input_ids, adapter_names=[...])``
* lorakit mixed: ``lora_model(input_ids, adapter_names=[...])`` (per-row gathered low-rank product; under
  no_grad the gathered factors are kept while the same layout comes again, as in generation)
* lorakit mixed, cold: the same with the gathered factors rebuilt on every call (a new layout each time)
* lorakit single: the same batch, one adapter for every row (the fused path)

Outputs of PEFT and lorakit mixed batches must agree (atol 1e-5 on the logits).

    python benchmarks/mixed_batch.py [--repeats 7] [--seq 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 8


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()


def write_adapters(folder: Path) -> list[Path]:
    """8 adapters with random A and B (so every row really differs), in PEFT format."""
    import lorakit

    model = lorakit.get_lora_model(base_model(), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False), "a0")
    for i in range(1, N_ADAPTERS):
        torch.manual_seed(i)
        model.add_adapter(f"a{i}", lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    paths = []
    for i in range(N_ADAPTERS):
        model.save_pretrained(folder / f"a{i}", adapter_name=f"a{i}")
        paths.append(folder / f"a{i}")
    return paths


def timed(fn, store: list[float]) -> torch.Tensor:
    started = time.perf_counter()
    with torch.no_grad():
        out = fn()
    store.append(time.perf_counter() - started)
    return out


def cold(model, ids, names) -> torch.Tensor:
    """A mixed batch as if its layout were new: no per-row factors kept from the previous call."""
    model._last_rows = None
    return model(input_ids=ids, adapter_names=names).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    import peft

    import lorakit

    with tempfile.TemporaryDirectory() as folder:
        paths = write_adapters(Path(folder))
        peft_model = peft.PeftModel.from_pretrained(base_model(), paths[0], adapter_name="a0")
        ours = lorakit.LoraModel.from_pretrained(base_model(), paths[0], adapter_name="a0")
        for i, path in enumerate(paths[1:], start=1):
            peft_model.load_adapter(path, adapter_name=f"a{i}")
            ours.load_adapter(path, adapter_name=f"a{i}")
    floor = base_model()
    peft_model.eval(), ours.eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (16, args.seq), generator=torch.Generator().manual_seed(0))
    names = [f"a{row // 2}" for row in range(16)]  # two rows per adapter
    ours.set_adapter("a0")
    runs = {
        "base model (floor)": lambda: floor(input_ids=ids).logits,
        "PEFT mixed batch": lambda: peft_model(input_ids=ids, adapter_names=names).logits,
        "lorakit mixed batch": lambda: ours(input_ids=ids, adapter_names=names).logits,
        "lorakit mixed batch, cold (factors gathered again)": lambda: cold(ours, ids, names),
        "lorakit one adapter for all rows": lambda: ours(input_ids=ids).logits,
    }
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, fn in runs.items():
            outputs[name] = timed(fn, times[name])
    torch.testing.assert_close(outputs["lorakit mixed batch"], outputs["PEFT mixed batch"], atol=1e-5, rtol=0)
    median = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"batch 16 x {args.seq} tokens, {N_ADAPTERS} adapters (r=16, all linear layers), torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats; PEFT and lorakit mixed outputs agree to 1e-5\n")
    print("| forward | median s | vs base | vs lorakit single |\n|---|---|---|---|")
    single = median["lorakit one adapter for all rows"]
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.3f} | {seconds / median['base model (floor)']:.2f}x | {seconds / single:.2f}x |")
    print(f"\nlorakit mixed / PEFT mixed: {median['lorakit mixed batch'] / median['PEFT mixed batch']:.2f}x "
          "(targets: lorakit mixed <= 1.1x lorakit single, and faster than PEFT's mixed batch)")


if __name__ == "__main__":
    main()
