"""LoRA layers and model operations against dense matrix maths."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, make_inputs, make_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import BASE_ROW, LoraConfig, get_lora_model
from lorakit.core.inits import INIT_STRATEGIES
from lorakit.core.layers import LoraEmbedding, LoraLinear
from lorakit.core.ops import lora_linear


def _dense_delta(layer, name):
    """s·B@A from the raw parameters, float64."""
    return layer.scaling[name] * layer.lora_B[name].double() @ layer.lora_A[name].double()


def _layer(base: nn.Module, rank=3, scale=0.7, dropout=0.0):
    layer = LoraEmbedding(base) if isinstance(base, nn.Embedding) else LoraLinear(base)
    layer.add_adapter("a", rank, scale, dropout, INIT_STRATEGIES["random"])
    layer.active_adapters = ["a"]
    return layer


@pytest.mark.parametrize("base_factory", [lambda: nn.Linear(6, 5), lambda: Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_linear_forward_is_dense_maths(base_factory):
    torch.manual_seed(0)
    layer = _layer(base_factory())
    W = layer.weight_view().double()  # (out, in) = (5, 6)
    x = torch.randn(2, 4, 6)
    expected = x.double() @ (W + _dense_delta(layer, "a")).T + layer.base_layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)


def test_embedding_forward_is_dense_maths():
    torch.manual_seed(0)
    layer = _layer(nn.Embedding(11, 4, padding_idx=0))
    ids = torch.randint(0, 11, (2, 5))
    table = layer.base_layer.weight.double() + _dense_delta(layer, "a").T  # (vocab, dim)
    torch.testing.assert_close(layer(ids).double(), table[ids], atol=1e-6, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_op_gradients(transposed, train_weight):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    weight = torch.randn(*((6, 5) if transposed else (5, 6)), dtype=torch.double, requires_grad=train_weight)
    bias = torch.randn(5, dtype=torch.double, requires_grad=train_weight)
    A = torch.randn(2, 6, dtype=torch.double, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.double, requires_grad=True)
    fn = lambda x, w, b, A, B: lora_linear(x, w, b, A, B, 0.3, transposed=transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, A, B))


def test_fused_op_with_dropout_matches_unfused():
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    W, A, B = torch.randn(5, 6), torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    torch.manual_seed(7)
    fused = lora_linear(x, W, None, A, B, 0.5, dropout=0.5, training=True)
    fused.sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    torch.manual_seed(7)
    reference = x @ W.T + 0.5 * nn.functional.dropout(x, 0.5, True) @ A.T @ B.T
    reference.sum().backward()
    torch.testing.assert_close(fused, reference)
    for ours, theirs in zip(grads, (x.grad, A.grad, B.grad)):
        torch.testing.assert_close(ours, theirs)


def _random_lora(family="llama", **kwargs):
    config = LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | kwargs))
    return get_lora_model(make_model(family), config)


def test_merge_unmerge_against_dense_maths():
    model = _random_lora()
    inputs = make_inputs("llama")
    unmerged = logits(model, inputs)
    path, layer = next(model.lora_layers())
    W0 = layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(layer.weight.double(), W0.double() + _dense_delta(layer, "default"))
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.weight, W0, atol=1e-7, rtol=0)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-6, rtol=0)


def test_bf16_unmerge_restores_exactly():
    model = _random_lora()
    model.model.to(torch.bfloat16)
    _, layer = next(model.lora_layers())
    W0 = layer.weight.detach().clone()
    model.merge_adapter()
    expected = (W0.float() + layer.delta_weight("default")).to(torch.bfloat16)  # merged in fp32, cast once
    assert torch.equal(layer.weight, expected)
    model.unmerge_adapter()
    assert torch.equal(layer.weight, W0)


def test_merge_and_unload_returns_plain_model_with_update():
    model = _random_lora()
    inputs = make_inputs("llama")
    expected = logits(model, inputs)
    deltas = {path: _dense_delta(layer, "default") + layer.weight.double() for path, layer in model.lora_layers()}
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    for path, weight in deltas.items():
        module = plain.get_submodule(path)
        assert type(module) is nn.Linear
        torch.testing.assert_close(module.weight.double(), weight)
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=0)


def test_unload_drops_the_update():
    base_logits = logits(make_model("llama"), make_inputs("llama"))
    plain = _random_lora(modules_to_save=["lm_head"]).unload()
    assert not any(isinstance(m, (LoraLinear,)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, make_inputs("llama")), base_logits, atol=0, rtol=0)


def test_disable_adapter_gives_base_and_restores_even_on_error():
    model = _random_lora(modules_to_save=["lm_head"])
    inputs = make_inputs("llama")
    base_logits = logits(make_model("llama"), inputs)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base_logits)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)
    assert all(layer.merged_adapters == ["default"] for _, layer in model.lora_layers())
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)


def test_several_adapters_add_up_and_switch():
    model = _random_lora()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False))
    inputs = make_inputs("llama")
    only_default = logits(model, inputs)
    model.set_adapter("other")
    only_other = logits(model, inputs)
    model.set_adapter(["default", "other"])
    both = logits(model, inputs)
    _, q = next(model.lora_layers())
    expected = q.weight.double() + _dense_delta(q, "default") + _dense_delta(q, "other")
    model.merge_adapter()
    torch.testing.assert_close(q.weight.double(), expected)
    torch.testing.assert_close(logits(model, inputs), both, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    assert not torch.allclose(only_default, only_other)
    # Only active adapters train.
    model.set_adapter("other")
    assert not q.lora_A["default"].requires_grad and q.lora_A["other"].requires_grad
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and "other" not in q.lora_A
    torch.testing.assert_close(logits(model, inputs), only_default, atol=1e-6, rtol=0)


def test_delete_last_adapter_restores_original_modules():
    model = _random_lora()
    model.delete_adapter("default")
    assert not list(model.lora_layers()) and model.peft_config == {}
    torch.testing.assert_close(logits(model, make_inputs("llama")), logits(make_model("llama"), make_inputs("llama")))


def test_mixed_adapter_batch_matches_per_row_runs():
    model = _random_lora(target_modules=["q_proj", "v_proj", "embed_tokens"])
    model.add_adapter("small", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    inputs = make_inputs("llama", batch=4)
    rows = ["small", BASE_ROW, "default", "small"]
    mixed = logits(model, inputs | {"adapter_names": rows})
    for i, name in enumerate(rows):
        row_inputs = {"input_ids": inputs["input_ids"][i : i + 1]}
        if name == BASE_ROW:
            with model.disable_adapter():
                expected = logits(model, row_inputs)
        else:
            model.set_adapter(name)
            expected = logits(model, row_inputs)
        torch.testing.assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=0)


def test_mixed_batch_wrong_length_is_an_error():
    model = _random_lora()
    with pytest.raises(ValueError, match="one adapter name"):
        model(**make_inputs("llama", batch=3), adapter_names=["default"])


def test_merge_weights_merges_on_eval_and_unmerges_on_train():
    model = _random_lora(merge_weights=True)
    _, layer = next(model.lora_layers())
    W0 = layer.weight.detach().clone()
    model.eval()
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.weight.double(), W0.double() + _dense_delta(layer, "default"))
    model.train()
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.weight, W0, atol=1e-7, rtol=0)


def test_attributes_forward_to_wrapped_model():
    model = _random_lora()
    assert model.config.model_type == "llama"
    out = model.generate(input_ids=make_inputs("llama")["input_ids"][:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)


def test_base_stays_frozen_and_gradients_reach_adapters():
    model = _random_lora()
    model.train()
    model(**make_inputs("llama")).logits.sum().backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("init", [True, "kaiming", "gaussian"])
def test_lora_inits_are_a_no_op(init):
    base_logits = logits(make_model("gpt2"), make_inputs("gpt2"))
    model = get_lora_model(make_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn", "wte"], init_lora_weights=init))
    torch.testing.assert_close(logits(model, make_inputs("gpt2")), base_logits, atol=0, rtol=0)
    for _, layer in model.lora_layers():
        zero, random = ("lora_A", "lora_B") if isinstance(layer, LoraEmbedding) else ("lora_B", "lora_A")
        assert getattr(layer, zero)["default"].abs().sum() == 0
        assert getattr(layer, random)["default"].abs().sum() > 0


def test_gaussian_init_std():
    torch.manual_seed(0)
    A, B, W = INIT_STRATEGIES["gaussian"](torch.zeros(64, 4096), 8, 1.0)
    assert abs(A.std().item() - 1 / 8) < 0.005 and B.abs().sum() == 0


def test_gradient_checkpointing_keeps_adapter_gradients():
    model = _random_lora()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(**make_inputs("llama")).logits.sum().backward()
    grads = [layer.lora_A["default"].grad for _, layer in model.lora_layers()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
