"""Offline fixtures for the training tests: a tiny local HF model directory (char-level tokenizer
with a chat template + a tiny Llama) and a fake BIG-bench sdist with the real archive layout."""

from __future__ import annotations

import io
import json
import string
import tarfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<user>", "<bot>"]
CHAT_TEMPLATE = "{% for m in messages %}<{{ 'user' if m['role'] == 'user' else 'bot' }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<bot>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_model(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_encoder(directory: Path, seed: int = 0) -> Path:
    """A tiny BERT sequence classifier (2 labels) with the char-level tokenizer."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, pad_token_id=0, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def multiple_choice_task(n: int = 60) -> dict:
    """A learnable toy task: is the number even?"""
    examples = [{"input": f"{i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(n)]
    return {"name": "parity", "append_choices_to_input": False, "examples": examples}


def write_fake_bigbench(cache: Path, tasks: dict[str, dict]) -> Path:
    """bigbench-1.0.0.tar.gz with <task>/task.json entries laid out as in the real sdist."""
    folder = cache / "bigbench"
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, spec in tasks.items():
            payload = json.dumps(spec).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def tiny_trainer(model_dir: Path, output: Path, items=None, lora=None, evaluate=None, **training):
    """A Trainer for a LoRA (r=4 on q/v unless `lora` says otherwise) on the tiny model in `model_dir`, learning
    parity from 40 items (or `items`), 10 steps of batch 4, a checkpoint every 2 steps, `evaluate` as its validation
    (none by default); `training` overrides."""
    from lorakit import LoraConfig, base_models, get_lora_model
    from lorakit.core.examples import tokenize_example
    from lorakit.training.trainer import Trainer, TrainingConfig

    model, tokenizer = base_models.load(model_dir)
    lora_model = get_lora_model(model, lora or LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    items = items or [tokenize_example(tokenizer, f"{i} even?", "yes" if i % 2 == 0 else "no", 32) for i in range(40)]
    config = TrainingConfig(**({"output_dir": str(output), "steps": 10, "batch_size": 4, "save_every": 2} | training))
    return Trainer(lora_model, items, config, tokenizer.pad_token_id, evaluate)


def slowed_cli(argv: list[str], seconds: float) -> str:
    """Python code running ``lorakit ARGV`` with every training step slowed by `seconds` (from the outside: the
    product is untouched), so a test can kill it mid-run."""
    import textwrap

    return textwrap.dedent(f"""
        import sys, time
        from lorakit import cli
        from lorakit.training import trainer as train
        step = train.Trainer.train_step
        def slow_step(self):
            out = step(self)
            time.sleep({seconds})
            return out
        train.Trainer.train_step = slow_step
        sys.exit(cli.main({argv!r}))
    """)
