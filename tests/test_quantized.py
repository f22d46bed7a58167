"""QLoRA: LoRA on bitsandbytes NF4 / FP4 / int8 bases (bitsandbytes' CPU backend). Adapters in float32 beside the
frozen quantised weights, PEFT's files both ways with PEFT's logits, merging into a dequantised model, and clear
refusals where the base would have to be rewritten."""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lorakit import LoraConfig, LoraModel, TargetModuleError, get_lora_model  # noqa: E402
from lorakit.core.quantized import DequantizedLinear, LoraQuantLinear, dequantize  # noqa: E402
from lorakit.training import base_models  # noqa: E402

KINDS = ["nf4", "fp4", "int8"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama wide enough for bitsandbytes' 64-wide quantisation blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("quantized") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(directory)
    return directory


def load(model_dir, kind):
    from transformers import AutoModelForCausalLM

    config = base_models.quantization_config(kind)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu").eval()
    for module in model.modules():  # one base kernel for lorakit and PEFT: the standard layout (lorakit's layers keep it)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def ids():
    return torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def perturbed_lora(model, seed: int = 4) -> LoraModel:
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            layer.lora_B["default"].normal_(std=0.05)
    return lora.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_train_in_float32_beside_the_quantised_weights(model_dir, kind):
    lora = perturbed_lora(load(model_dir, kind))
    layers = dict(lora.lora_layers())
    assert layers and all(isinstance(layer, LoraQuantLinear) for layer in layers.values())
    assert all(layer.lora_A["default"].dtype == torch.float32 for layer in layers.values())
    assert all(not layer.base_layer.weight.is_floating_point() for layer in layers.values())  # still packed uint8 / int8
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    for _ in range(8):
        loss = lora(input_ids=ids(), labels=ids()).loss
        loss.backward()
        assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_a_qlora_adapter_and_lorakit_loads_peft_s_with_the_same_logits(model_dir, kind, tmp_path):
    import peft

    ours = perturbed_lora(load(model_dir, kind))
    with torch.no_grad():
        expected = ours(input_ids=ids()).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load(model_dir, kind), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids()).logits, expected, atol=1e-5, rtol=1e-5)

    reference = peft.get_peft_model(load(model_dir, kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        expected = reference(input_ids=ids()).logits
    reference.save_pretrained(tmp_path / "theirs")
    loaded = LoraModel.from_pretrained(load(model_dir, kind), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids()).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merging_makes_a_dequantised_layer_with_the_update_and_unmerging_restores_the_quantised_one(model_dir, kind):
    lora = perturbed_lora(load(model_dir, kind))
    layer = dict(lora.lora_layers())["model.layers.0.self_attn.q_proj"]
    quantised = layer.base_layer
    expected_weight = dequantize(quantised) + layer.delta_weight("default")  # dense maths, float32
    with torch.no_grad():
        before = lora(input_ids=ids()).logits
    lora.merge_adapter()
    dense = layer.base_layer
    assert isinstance(dense, DequantizedLinear) and dense.weight.dtype == torch.float32  # the dtype the model was quantised from
    torch.testing.assert_close(dense.weight, expected_weight, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids()).logits, before, atol=5e-2, rtol=5e-2)
    lora.unmerge_adapter()
    assert layer.base_layer is quantised  # the very same quantised layer, untouched
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids()).logits, before, atol=0, rtol=0)

    merged = lora.merge_and_unload()
    assert all(isinstance(m, DequantizedLinear) for name, m in merged.named_modules() if name.endswith(tuple(TARGETS)))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids()).logits, before, atol=5e-2, rtol=5e-2)


def test_wrapping_keeps_the_4bit_layout_and_unloading_gives_the_layer_its_own_settings_back(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=base_models.quantization_config("nf4"),
                                                 device_map="cpu").eval()
    layers = {name: m for name, m in model.named_modules() if name.endswith("q_proj")}
    settings = {name: m.support_avx512bf16_for_cpu for name, m in layers.items()}
    lora = perturbed_lora(model)
    with torch.no_grad():
        lora(input_ids=ids())  # an inference forward: bitsandbytes would repack a layer whose setting allows it
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    assert {name: m.support_avx512bf16_for_cpu for name, m in layers.items()} == settings  # never changed
    plain = lora.unload()
    assert all(plain.get_submodule(name) is m for name, m in layers.items())


def test_training_on_a_layer_repacked_for_cpu_inference_is_refused_not_silently_gradient_free(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=base_models.quantization_config("nf4"),
                                                 device_map="cpu").eval()
    with torch.no_grad():
        model(input_ids=ids())  # bitsandbytes repacks its 4-bit weights for the CPU kernel (no autograd through it)
    cpu_repacks = bnb.functional.has_avx512bf16()
    if not cpu_repacks:  # this CPU lacks AVX512-BF16, so bitsandbytes left the layout alone: repack with its own converter
        for layer in (m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)):
            layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state)
    lora = perturbed_lora(model).train()
    with pytest.raises(TargetModuleError, match="repacked for bitsandbytes' CPU inference kernel.*support_avx512bf16_for_cpu = False"):
        lora(input_ids=ids(), labels=ids()).loss.backward()
    if cpu_repacks:  # inference through the packed kernel (AVX512-BF16 only) stays allowed
        with torch.no_grad():
            lora(input_ids=ids())


def test_inits_that_move_the_base_are_refused_and_the_model_is_unchanged(model_dir):
    model = load(model_dir, "nf4")
    state = {name: copy.deepcopy(p.data) for name, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(TargetModuleError, match="quantised base cannot hold"):
        get_lora_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa", svd_cache=False))
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(p.data, state[name]) for name, p in model.named_parameters())
    lora = get_lora_model(model, LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(TargetModuleError, match="quantised"):
        dict(lora.lora_layers())["model.layers.0.self_attn.q_proj"].weight_view()


def test_qlora_trains_from_the_cli_and_evaluates(tmp_path):
    import json
    import subprocess
    import sys

    from offline_fixtures import multiple_choice_task, write_fake_bigbench, write_tiny_model
    from safetensors.torch import load_file
    from test_train import _env

    write_tiny_model(tmp_path / "model", hidden=128)  # bitsandbytes quantises in blocks of 64
    write_fake_bigbench(tmp_path / "cache", {"parity": multiple_choice_task(60)})
    run = tmp_path / "run"
    command = [sys.executable, "-m", "lorakit.cli", "train", f"model.name={tmp_path / 'model'}", "model.quantization=nf4",
               "training.precision=bf16", "training.gradient_checkpointing=true", "data.source=bigbench:parity", "data.test_size=8",
               "data.validation_size=4", "lora.target_modules=[q_proj, v_proj]", f"training.output_dir={run}", "training.steps=3",
               "training.batch_size=4", "training.eval_every=3", "training.save_every=3", "training.max_length=32"]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved and all(value.dtype == torch.float32 for value in saved.values())
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # it trained: B left its zero init
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in metrics[-1] and all(m["grad_norm"] > 0 for m in metrics)  # after the zero-shot evaluation too
    evaluation = subprocess.run([sys.executable, "-m", "lorakit.cli", "eval", "--model", str(tmp_path / "model"), "--quantization", "nf4",
                                 "--adapter", str(run / "adapter"), "--data", "bigbench:parity", "--test-size", "8", "--validation-size", "4"],
                                env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert json.loads(evaluation.stdout)["items"] == 8


def test_ia3_trains_on_a_quantised_base_and_refuses_to_merge_into_it(model_dir):
    from lorakit import IA3Config, get_peft_model

    model = get_peft_model(load(model_dir, "nf4"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"]))
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad is not None for p in trained)
    stored = {name: p.data.clone() for name, p in model.named_parameters()}
    with pytest.raises(TargetModuleError, match="IA3 cannot merge into this quantised"):
        model.merge_adapter()
    assert all(torch.equal(p.data, stored[name]) for name, p in model.named_parameters())


def test_plora_refuses_a_quantised_base_before_training(model_dir):
    from lorakit import LoraConfigError, PeriodicLoRA, PLoRAConfig

    lora = get_lora_model(load(model_dir, "nf4"), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(LoraConfigError, match="PLoRA unloads the adapter into the base weights"):
        PeriodicLoRA(lora, PLoRAConfig(unload_every=8))


def test_an_ia3_adapter_trained_on_a_quantised_base_loads_back_with_the_same_logits(model_dir, tmp_path):
    from lorakit import IA3Config, get_peft_model, load_peft_model

    model = get_peft_model(load(model_dir, "nf4"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"], init_ia3_weights=False)).eval()
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
    model.save_pretrained(tmp_path / "ia3")
    again = load_peft_model(load(model_dir, "nf4"), tmp_path / "ia3").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids()).logits, expected, atol=0, rtol=0)


def test_qlora_with_a_sharded_base_over_two_processes_matches_one_process(tmp_path):
    import subprocess
    import sys

    from offline_fixtures import multiple_choice_task, write_fake_bigbench, write_tiny_model
    from safetensors.torch import load_file
    from test_train import _env, _free_port

    write_tiny_model(tmp_path / "model", hidden=128)
    write_fake_bigbench(tmp_path / "cache", {"parity": multiple_choice_task(60)})
    settings = [f"model.name={tmp_path / 'model'}", "model.quantization=nf4", "training.precision=bf16", "data.source=bigbench:parity",
                "data.test_size=8", "data.validation_size=0", "lora.target_modules=[q_proj, v_proj]", "lora.lora_dropout=0.0",
                "training.steps=3", "training.batch_size=4", "training.save_every=0", "training.max_length=32", "training.lr=0.01"]
    one_process = [sys.executable, "-m", "lorakit.cli"]
    two_processes = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "lorakit.cli"]
    for name, launcher, extra in [("one", one_process, []), ("two", two_processes, ["training.fsdp=true"])]:
        result = subprocess.run([*launcher, "train", *settings, *extra, f"training.output_dir={tmp_path / name}"], env=_env(tmp_path),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "| processes" in (tmp_path / "two" / "summary.md").read_text() and "FSDP" in (tmp_path / "two" / "summary.md").read_text()
    one, two = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("one", "two"))
    for key in [k for k in one if "lora_B" in k]:  # trained away from zero; bf16 autocast: the runs sum in other orders
        assert one[key].norm() > 0.1 and (two[key] - one[key]).norm() < 0.02 * one[key].norm(), key
