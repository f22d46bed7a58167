"""Activation checkpointing and mixed precision (``training.gradient_checkpointing``, ``training.precision``):
the same gradients with and without checkpointing for every method, float32 adapters and optimizer state over a
half-type base, fp16's scaler in the checkpoint, and both settings from `lorakit train`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_inputs, make_model
from offline_fixtures import tiny_trainer, write_tiny_model
from safetensors.torch import load_file
from test_train import _config_file, _train_cli

from lorakit import (
    IA3Config,
    LoraConfig,
    LSTConfig,
    LSTModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    UnsupportedModelError,
    get_peft_model,
)
from lorakit.training.precision import enable_activation_checkpointing

METHOD_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="gaussian"),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "p_tuning": lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
}


def _gradients(model) -> dict[str, torch.Tensor]:
    ids = make_inputs("llama")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_activation_checkpointing_gives_the_same_gradients(method):
    torch.manual_seed(0)
    plain = get_peft_model(make_model("llama"), METHOD_CONFIGS[method]())
    with torch.no_grad():  # move the adapter off its no-op init so every gradient is non-trivial
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.model.layers)
    expected, got = _gradients(plain), _gradients(checkpointed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_refuses_prefix_tuning_clearly():
    model = get_peft_model(make_model("llama"), PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(UnsupportedModelError, match="gradient_checkpointing=false"):
        enable_activation_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in model.model.model.layers)


def test_activation_checkpointing_leaves_lst_alone():
    model = LSTModel(make_model("llama"), LSTConfig(reduction_factor=2))
    enable_activation_checkpointing(model)  # the backbone keeps no activations for backward: nothing to recompute
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.model.layers)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_float32_adapters_over_a_half_base(tmp_path, precision):
    model_dir = write_tiny_model(tmp_path / "model")
    reference = tiny_trainer(model_dir, tmp_path / "fp32", save_every=0)
    trainer = tiny_trainer(model_dir, tmp_path / precision, precision=precision, save_every=5)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    history, expected = trainer.fit(), reference.fit()
    lora = trainer.module
    base = [p for name, p in lora.named_parameters() if "lora_" not in name]
    trained = [p for p in lora.parameters() if p.requires_grad]
    assert base and all(p.dtype == half for p in base)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(v.dtype == torch.float32 for state in trainer.optimizer.state.values() for v in state.values() if v.dim())
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in history)
    assert abs(history[0]["loss"] - expected[0]["loss"]) < 0.05 * expected[0]["loss"]  # the same model, rounded
    assert history[-1]["loss"] < history[0]["loss"]
    state = torch.load(tmp_path / precision / "checkpoints" / "step-000010" / "trainer_state.pt", weights_only=False)
    assert bool(state["scaler"]) == (precision == "fp16")  # fp16's loss scale is resumed with the rest
    saved = load_file(tmp_path / precision / "checkpoints" / "step-000010" / "trainable.safetensors")
    assert all(value.dtype == torch.float32 for value in saved.values())


@pytest.mark.parametrize("method", ["lora", "lst"])
def test_bf16_and_activation_checkpointing_from_the_cli(workspace, method):  # noqa: F811
    config = _config_file(workspace, f"bf16-{method}", steps=4, eval_every=2, save_every=2, method=method,
                          precision="bf16", gradient_checkpointing=True)
    _train_cli(workspace, config, "lst.reduction_factor=2")
    run = workspace / f"bf16-{method}"
    assert "fine-tuned accuracy" in (run / "summary.md").read_text()
    weights = "lst_model.safetensors" if method == "lst" else "adapter_model.safetensors"
    assert all(value.dtype == torch.float32 for value in load_file(run / "adapter" / weights).values())
