"""Adapters move both ways between lorakit and HF PEFT, with the same numbers, for every config option."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import TARGETS, logits, make_inputs, make_model
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.core.loading import adapter_parameters
from lorakit.core.peft_format import PREFIX

ATOL = 1e-5


LAYER_LISTS = {"llama": "layers", "gpt2": "h", "bert": "layer", "t5": "block"}


def variants(family: str) -> dict[str, dict]:
    targets, embedding, head = TARGETS[family]
    base = dict(r=4, lora_alpha=8, target_modules=targets)
    first, second = targets
    return {
        "plain": base,
        "rslora": base | dict(use_rslora=True, lora_alpha=6),
        "dropout": base | dict(lora_dropout=0.2),
        "bias_all": base | dict(bias="all"),
        "bias_lora_only": base | dict(bias="lora_only"),
        "modules_to_save": base | dict(modules_to_save=[head]),
        "patterns": base | dict(rank_pattern={first: 2}, alpha_pattern={second: 3}),
        "layers_to_transform": base | dict(layers_to_transform=[1]),
        "layers_pattern": base | dict(layers_to_transform=0, layers_pattern=LAYER_LISTS[family]),
        "exclude": base | dict(exclude_modules=r".*\.0\..*"),
        "regex": dict(r=3, lora_alpha=5, target_modules=rf".*\.({first}|{second})"),
        "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
        "embedding": base | dict(target_modules=targets + [embedding]),
    }


CASES = [(f, v) for f in TARGETS for v in variants(f)]


def _perturb_trainables(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor (A, B, biases, saved modules) off its init so saving is tested for real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _peft_key(name: str) -> str:
    return name.replace(".modules_to_save.default", "").replace(".default", "")


def _peft_grads(peft_model) -> dict[str, torch.Tensor]:
    return {_peft_key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def _lorakit_grads(model: LoraModel) -> dict[str, torch.Tensor]:
    return {key: p.grad for key, p in adapter_parameters(model, "default") if p.requires_grad}


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_lorakit_adapter_loads_in_peft(tmp_path, family, variant):
    kwargs = variants(family)[variant]
    model = get_lora_model(make_model(family), LoraConfig(**kwargs, init_lora_weights=False))
    _perturb_trainables(model, seed=3)
    model.save_pretrained(tmp_path)
    inputs = make_inputs(family)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on any config key it does not know
        peft_config = peft.PeftConfig.from_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(make_model(family), tmp_path, is_trainable=True)
    reference.eval()  # PEFT leaves its new dropout modules in training mode when is_trainable=True
    torch.testing.assert_close(logits(reference, inputs), logits(model, inputs), atol=ATOL, rtol=0)
    assert peft_config.r == kwargs["r"]

    # Training mode: same dropout masks (same RNG order), same outputs, same gradients.
    model.train(), reference.train()
    for m in (model, reference):
        torch.manual_seed(11)
        m(**inputs).logits.square().mean().backward()
    ours, theirs = _lorakit_grads(model), _peft_grads(reference)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_peft_adapter_loads_in_lorakit(tmp_path, family, variant):
    kwargs = variants(family)[variant]
    reference = peft.get_peft_model(make_model(family), peft.LoraConfig(**kwargs, init_lora_weights=False))
    _perturb_trainables(reference, seed=4)
    reference.save_pretrained(tmp_path)
    reference.eval()

    model = LoraModel.from_pretrained(make_model(family), tmp_path)
    inputs = make_inputs(family)
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=ATOL, rtol=0)
    assert model.get_nb_trainable_parameters()[0] == 0  # loaded for inference by default

    # Saving again writes the same keys PEFT wrote (PEFT may add embedding base weights; lorakit does not).
    model.save_pretrained(tmp_path / "again")
    peft_keys = {k for k in load_file(tmp_path / "adapter_model.safetensors") if not k.endswith("base_layer.weight")}
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == peft_keys


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_same_trainable_parameters_as_peft(family, variant):
    kwargs = variants(family)[variant]
    ours = get_lora_model(make_model(family), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(make_model(family), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_config_file_has_peft_fields(tmp_path):
    model = get_lora_model(make_model("llama"), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True))
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 16
    assert written["use_rslora"] is True and written["use_dora"] is False
    assert "merge_weights" not in written  # lorakit-only fields appear only when set
    assert all(key.startswith(PREFIX) and ".default" not in key for key in load_file(tmp_path / "adapter_model.safetensors"))


def test_seq2seq_generate_after_roundtrip(tmp_path):
    model = get_lora_model(make_model("t5"), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(make_model("t5"), tmp_path)
    ids = make_inputs("t5")["input_ids"]
    ours = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    theirs = reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, theirs)
