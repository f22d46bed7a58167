"""Every error path: clear messages, and the model and files left exactly as they were."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import logits, make_inputs, make_model
from safetensors.torch import load_file, save_file

import lorakit.core.peft_format
from lorakit import (
    AdapterLoadError,
    AdapterNameError,
    LoraConfig,
    LoraConfigError,
    LoraModel,
    TargetModuleError,
    get_lora_model,
)


def _snapshot(model: torch.nn.Module):
    """Everything a failed call must not change: module types, parameter values and flags."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def _assert_unchanged(model, snapshot):
    modules, params = snapshot
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for name, (value, flag) in params.items():
        assert torch.equal(now[name], value) and now[name].requires_grad == flag, name


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "r=0 is not a valid rank"),
        (dict(r=2.5), "valid rank"),
        (dict(lora_alpha=0), "lora_alpha=0 is not a valid alpha"),
        (dict(lora_alpha=1e308), r"lora_alpha=1e\+308 is not a valid alpha.*float32"),
        (dict(lora_dropout=1.0), "0 <= lora_dropout < 1"),
        (dict(lora_dropout=-0.1), "0 <= lora_dropout < 1"),
        (dict(bias="some"), r"use one of \['none', 'all', 'lora_only'\]"),
        (dict(init_lora_weights="olora"), "not a known init"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]"),
        (dict(target_modules=None), "target_modules is not set"),
        (dict(target_modules="q_proj("), "not a valid regular expression"),
        (dict(use_rslora="false"), r"use_rslora='false' \(str\) is not valid: use true/false"),
        (dict(merge_weights="no"), "merge_weights='no'"),
        (dict(lora_dropout="0.1"), "lora_dropout='0.1'"),
        (dict(lora_alpha=float("inf")), "lora_alpha=inf"),
        (dict(lora_alpha=float("nan")), "lora_alpha=nan"),
        (dict(target_modules=5), "target_modules=5"),
        (dict(modules_to_save={"lm_head"}), "modules_to_save="),
        (dict(modules_to_save=["lm_head("]), "modules_to_save='lm_head\\('"),
        (dict(rank_pattern={"q(": 2}), "rank_pattern key"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(LoraConfigError, match=message):
        LoraConfig(**({"target_modules": ["q_proj"]} | kwargs))


def test_target_matching_nothing_lists_module_names():
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(TargetModuleError) as err:
        get_lora_model(model, LoraConfig(target_modules=["query"]))
    assert "matches no" in str(err.value) and "self_attn.q_proj" in str(err.value)
    _assert_unchanged(model, snapshot)


def test_unsupported_target_type_is_refused_before_any_change():
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(TargetModuleError, match="LlamaAttention.*supports"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj", "self_attn"]))
    with pytest.raises(TargetModuleError, match="modules_to_save entry 'head'"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    _assert_unchanged(model, snapshot)


def test_failing_init_leaves_model_unchanged(monkeypatch):
    model = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    snapshot = _snapshot(model)
    calls = []

    def exploding_init(W, r, scale):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("init failed")
        return torch.zeros(r, W.shape[1]), torch.zeros(W.shape[0], r), W

    monkeypatch.setitem(lorakit.core.inits.INIT_STRATEGIES, "kaiming", exploding_init)
    with pytest.raises(RuntimeError, match="init failed"):
        model.add_adapter("second", LoraConfig(target_modules=["q_proj", "v_proj"]))
    _assert_unchanged(model, snapshot)
    assert list(model.peft_config) == ["default"]


def test_adapter_name_errors():
    model = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match="exists already"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match=r"no adapter named 'nope'; this model has \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(AdapterNameError, match="no adapter named"):
        model(**make_inputs("llama", batch=1), adapter_names=["nope"])


def _saved(tmp_path, **kwargs):
    model = get_lora_model(make_model("llama"), LoraConfig(**({"r": 4, "target_modules": ["q_proj", "v_proj"]} | kwargs)))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_shape_mismatch_names_module_and_shapes_and_changes_nothing(tmp_path):
    _saved(tmp_path, r=4)
    model = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterLoadError) as err:
        model.load_adapter(tmp_path, "other")
    message = str(err.value)
    assert "model.layers.1.self_attn.v_proj.lora_A.weight" in message and "(4, 31)" in message and "(4, 32)" in message
    _assert_unchanged(model, snapshot)
    assert list(model.peft_config) == ["default"]


def test_module_missing_from_model_is_named(tmp_path):
    _saved(tmp_path)
    bigger = make_model("llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the file still holds v_proj tensors
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    snapshot = _snapshot(bigger)
    with pytest.raises(AdapterLoadError, match="v_proj.lora_A.weight'.*no place for"):
        LoraModel.from_pretrained(bigger, tmp_path)
    _assert_unchanged(bigger, snapshot)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(AdapterLoadError, match="adapter_config.json does not exist"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match="has no adapter_model.safetensors"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_corrupt_files_are_named(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors could not be read.*corrupt"):
        LoraModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="adapter_config.json is not valid JSON"):
        LoraModel.from_pretrained(model, tmp_path)


def test_unsupported_peft_feature_is_refused(tmp_path):
    reference = peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    reference.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match="use_dora=True, which lorakit does not support"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_legacy_bin_is_refused_without_unpickling(tmp_path, monkeypatch):
    """Adapters load from safetensors only: a .bin (a pickle) is never opened, and the message says how to convert."""
    _saved(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    opened = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: opened.append(args))
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="safetensors only.*safe_serialization=True"):
        LoraModel.from_pretrained(model, tmp_path)
    assert opened == []
    _assert_unchanged(model, snapshot)


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    model = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    with torch.no_grad():
        next(model.lora_layers())[1].lora_A["default"].add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.core.peft_format, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "adapter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left behind
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_from_pretrained_trainable_flag(tmp_path):
    _saved(tmp_path)
    frozen = LoraModel.from_pretrained(make_model("llama"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    trainable = LoraModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 4 * 2 * 4 * 32 - 2 * 4 * 16
    inputs = make_inputs("llama")
    torch.testing.assert_close(logits(frozen, inputs), logits(trainable, inputs))


def test_save_all_adapters_uses_peft_layout(tmp_path):
    model = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("extra", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "extra" / "adapter_config.json").exists()
    reference = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    reference.load_adapter(tmp_path / "extra", "extra")
    reference.base_model.set_adapter(["default", "extra"])
    model.set_adapter(["default", "extra"])
    inputs = make_inputs("llama")
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=0)
