"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI replays the same generated inputs every run (no flaky red from a new random draw); a developer's run
# explores new ones (HYPOTHESIS_PROFILE=dev). Examples per test are set where each test is defined.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config)


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}

# For each family: modules to target, an embedding module, and a head for modules_to_save.
TARGETS = {
    "llama": (["q_proj", "v_proj"], "embed_tokens", "lm_head"),
    "gpt2": (["c_attn", "c_fc"], "wte", "ln_f"),
    "bert": (["query", "value"], "word_embeddings", "classifier"),
    "t5": (["q", "v"], "shared", "lm_head"),
}


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The same tiny model (same weights) for a given family and seed, in eval mode."""
    torch.manual_seed(seed)
    return FACTORIES[family]().eval()


def make_inputs(family: str, batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (batch, 5), generator=generator)}
    return {"input_ids": ids}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=list(FACTORIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny local model and a fake BIG-bench cache (task ``parity``), shared by the tests of a module."""
    from offline_fixtures import multiple_choice_task, write_fake_bigbench, write_tiny_model

    root = tmp_path_factory.mktemp("workspace")
    write_tiny_model(root / "model")
    write_fake_bigbench(root / "cache", {"parity": multiple_choice_task(80)})
    return root
