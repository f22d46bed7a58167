"""lorakit in one minute, on a tiny Llama built from a config (nothing is downloaded).

Trains a rank-8 LoRA so the model learns "next token = this token + 1", then shows the PEFT-format
adapter round trip, merging, and a mixed-adapter batch. Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

VOCAB, STEPS = 64, 150


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def counting_batch(generator: torch.Generator, batch: int = 16, seq: int = 12) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + torch.arange(seq)) % VOCAB  # each row counts up: the task LoRA must learn


def accuracy(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (predicted == ids[:, 1:]).float().mean().item()


def main() -> None:
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05)
    model = lorakit.get_lora_model(base_model(), config)
    model.print_trainable_parameters()

    generator = torch.Generator().manual_seed(0)
    test_ids = counting_batch(torch.Generator().manual_seed(123), batch=64)
    print(f"next-token accuracy before training: {accuracy(model.eval(), test_ids):.3f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in (bar := tqdm(range(STEPS), desc="training LoRA")):
        ids = counting_batch(generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    trained = accuracy(model, test_ids)
    print(f"next-token accuracy after training:  {trained:.3f}")

    with tempfile.TemporaryDirectory() as adapter_dir:
        model.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors, PEFT's format
        reloaded = lorakit.LoraModel.from_pretrained(base_model(), adapter_dir)
        print(f"reloaded adapter accuracy:           {accuracy(reloaded, test_ids):.3f}")
        try:
            import peft

            in_peft = peft.PeftModel.from_pretrained(base_model(), adapter_dir)
            print(f"same adapter loaded by PEFT:         {accuracy(in_peft, test_ids):.3f}")
        except ImportError:
            print("(install peft to load the same adapter with PEFT)")

    with model.disable_adapter():
        print(f"base model (adapter disabled):       {accuracy(model, test_ids):.3f}")
    rows = [lorakit.BASE_ROW, "default"] * 32
    with torch.no_grad():
        mixed = model(input_ids=test_ids, adapter_names=rows).logits[:, :-1].argmax(-1)
    adapted_rows = (mixed == test_ids[:, 1:])[1::2].float().mean().item()
    print(f"mixed batch, rows with the adapter:  {adapted_rows:.3f}")

    merged = model.merge_and_unload()  # a plain LlamaForCausalLM with the update folded in
    print(f"merged plain model:                  {accuracy(merged, test_ids):.3f}")
    assert abs(accuracy(merged, test_ids) - trained) < 1e-6


if __name__ == "__main__":
    main()
