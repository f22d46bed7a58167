"""PLoRA: unloads against dense maths, momentum, optimizer reset, per-stage schedule, bf16 bases,
export (exact via PEFT, compressed against the SVD tail), resume mid-stage, HF Trainer callback, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import logits, make_inputs, make_model
from offline_fixtures import write_tiny_model

from lorakit import (
    LoraConfig,
    LoraConfigError,
    LoraEmbedding,
    base_models,
    get_lora_model,
)
from lorakit.core import examples
from lorakit.methods.plora.export import compress, export_plora, run_update
from lorakit.methods.plora.periodic import PeriodicLoRA, PLoRAConfig, read_stages
from lorakit.training.trainer import Trainer, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _lora(dtype=torch.float32, **config):
    model = make_model("llama").to(dtype)
    lora = get_lora_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, **config))
    return model, lora


def _randomise(lora, generator) -> None:
    """Stand-in for a stage of training: new random factors in every layer."""
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            for table in (layer.lora_A, layer.lora_B):
                table["default"].copy_(0.1 * torch.randn(table["default"].shape, generator=generator))


def _weights(lora) -> dict[str, torch.Tensor]:
    return {path: layer.weight_view().detach().float().clone() for path, layer in lora.lora_layers()}


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_unloads_add_up_to_the_stage_updates_and_keep_the_output(momentum):
    _, lora = _lora()
    plora = PeriodicLoRA(lora, PLoRAConfig(unload_every=1, unit="steps", momentum=momentum))
    expected = _weights(lora)
    inputs, generator = make_inputs("llama"), torch.Generator().manual_seed(0)
    for _ in range(3):
        _randomise(lora, generator)
        for path, layer in lora.lora_layers():  # dense maths from the live factors, before the unload
            expected[path] += (1 - momentum) * layer.scaling["default"] * (layer.lora_B["default"].float() @ layer.lora_A["default"].float())
        before = logits(lora, inputs)
        assert plora.step(samples=4)
        torch.testing.assert_close(logits(lora, inputs), before, atol=1e-5, rtol=0)  # sqrt momentum / m = 0 keep the output
    for path, W in _weights(lora).items():
        torch.testing.assert_close(W, expected[path], atol=1e-6, rtol=0)
    for _, layer in lora.lora_layers():
        if momentum == 0 and isinstance(layer, LoraEmbedding):
            assert not layer.lora_A["default"].any()  # restarted like PEFT's embedding init: A = 0, B random
        elif momentum == 0:
            assert not layer.lora_B["default"].any()  # restarted: B = 0, A fresh kaiming-uniform
            assert layer.lora_A["default"].abs().max() <= 1 / math.sqrt(layer.lora_A["default"].shape[1])
    assert len(plora.stages) == 3 and [s.coefficient for s in plora.stages] == [1 - momentum] * 3


def test_linear_momentum_scaling_drops_part_of_the_update():
    _, lora = _lora()
    plora = PeriodicLoRA(lora, PLoRAConfig(unload_every=1, unit="steps", momentum=0.5, momentum_scaling="linear"))
    _randomise(lora, torch.Generator().manual_seed(0))
    path, layer = next(iter(lora.lora_layers()))
    W, delta = layer.weight_view().detach().clone(), layer.delta_weight("default")
    plora.unload()
    # the model now holds W + 0.5·ΔW (unloaded) + 0.25·ΔW (adapter): 0.25·ΔW is gone
    torch.testing.assert_close(layer.weight_view() + layer.delta_weight("default"), W + 0.75 * delta, atol=1e-6, rtol=0)


def test_optimizer_state_reset_or_kept():
    for policy in ("reset", "keep"):
        _, lora = _lora()
        plora = PeriodicLoRA(lora, PLoRAConfig(unload_every=1, unit="steps", optimizer_state=policy))
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        lora(**make_inputs("llama")).logits.sum().backward()
        optimizer.step()
        assert len(optimizer.state) > 0
        plora.step(optimizer)
        adapter_params = [p for _, layer in lora.lora_layers() for p in (layer.lora_A["default"], layer.lora_B["default"])]
        assert all((p in optimizer.state) == (policy == "keep") for p in adapter_params)


def test_bf16_base_loses_no_update(tmp_path):
    model, lora = _lora(torch.bfloat16)
    original = _weights(lora)
    plora = PeriodicLoRA(lora, PLoRAConfig(unload_every=1, unit="steps"), history_dir=tmp_path)
    naive = {path: layer.weight_view().detach().clone() for path, layer in lora.lora_layers()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        _randomise(lora, generator)
        with torch.no_grad():
            for _, layer in lora.lora_layers():
                layer.lora_B["default"].mul_(1e-3)  # updates far below bf16's resolution of the weights
        for path, layer in lora.lora_layers():
            naive[path] = (naive[path].float() + layer.delta_weight("default")).to(torch.bfloat16)
        plora.unload()
    lost = 0
    for key, (path, layer) in zip(plora.layers, lora.lora_layers()):
        exact = original[path] + plora.total_delta(key)  # W0 + Σ stage updates, float32
        torch.testing.assert_close(layer.weight_view(), exact.to(torch.bfloat16), atol=0, rtol=0)  # one rounding
        lost += int((naive[path] != layer.weight_view()).sum())
    assert lost > 0  # stage-by-stage rounding would have lost updates that the exact total keeps
    _, fresh = _lora(torch.bfloat16)  # resuming: the recorded stages replayed onto the original base
    PeriodicLoRA(fresh, PLoRAConfig(unload_every=1, unit="steps"), history_dir=tmp_path).load_state_dict(plora.state_dict())
    for (_, a), (_, b) in zip(lora.lora_layers(), fresh.lora_layers()):
        torch.testing.assert_close(b.weight_view(), a.weight_view(), atol=0, rtol=0)


def _items(tokenizer, n=32):
    return [examples.tokenize_example(tokenizer, f"{i} is even?", "yes" if i % 2 == 0 else "no", 32) for i in range(n)]


def _train(root: Path, name: str, steps: int, stop_at: int | None = None, resume: bool = False, **plora_config):
    """Train a tiny local model with PLoRA (a fresh model each call, as a new process would)."""
    model, tokenizer = base_models.load(root / "model")
    torch.manual_seed(0)
    lora = get_lora_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"]))
    config = TrainingConfig(output_dir=str(root / name), steps=steps, batch_size=4, lr=0.02, warmup_steps=1,
                            eval_every=0, save_every=2, resume=resume)
    plora = PeriodicLoRA(lora, PLoRAConfig(**({"unload_every": 12} | plora_config)), history_dir=root / name / "plora")
    trainer = Trainer(lora, _items(tokenizer), config, tokenizer.pad_token_id, plora=plora)
    history = []
    while trainer.step < (stop_at or steps):
        metrics = trainer.train_step()
        trainer._log(metrics)
        history.append(metrics)
        if trainer.step % config.save_every == 0:
            trainer.save_checkpoint()
    lora.save_pretrained(root / name / "adapter")
    return model, lora, plora, history, tokenizer


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("plora")
    write_tiny_model(root / "model")
    return root


def test_per_stage_schedule_restarts_and_unloads_at_stage_ends(hub):
    _, _, plora, history, _ = _train(hub, "schedule", steps=9)
    assert [m["step"] for m in history if "unloaded" in m] == [3, 6, 9]
    lrs = [m["lr"] for m in history]
    assert lrs[0:3] == lrs[3:6] == lrs[6:9] and lrs[0] < lrs[1]  # warm-up and decay in every stage
    assert [s.samples for s in plora.stages] == [12, 24, 36]
    with pytest.raises(LoraConfigError, match="multiple of the batch size"):
        PLoRAConfig(unload_every=10).stage_steps(4)


def test_exact_export_loads_in_peft_on_the_original_base(hub, tmp_path):
    model, lora, plora, _, _ = _train(hub, "export", steps=7, momentum=0.3)
    inputs = make_inputs("llama", seq=9)
    inputs["input_ids"] %= model.config.vocab_size
    trained = logits(lora, inputs)
    report = export_plora(hub / "export", tmp_path / "total")
    assert report["stages"] == 2 and report["rank"] == 3 * 2
    original, _ = base_models.load(hub / "model")
    peft_model = peft.PeftModel.from_pretrained(original, tmp_path / "total")
    torch.testing.assert_close(logits(peft_model, inputs), trained, atol=1e-5, rtol=0)


def test_compressed_export_error_is_the_svd_tail(hub, tmp_path):
    _, _, _, _, _ = _train(hub, "compress", steps=9)
    _, _, total, stages = run_update(hub / "compress")
    report = export_plora(hub / "compress", tmp_path / "k3", rank=3)
    errors = json.loads((tmp_path / "k3" / "export_report.json").read_text())["relative_errors"]
    for key, update in total.items():
        dense = (update.B.double() @ update.A.double())
        S = torch.linalg.svdvals(dense)
        tail = math.sqrt(float(S[3:].square().sum() / S.square().sum()))
        assert errors[key] == pytest.approx(tail, rel=1e-6, abs=1e-9)
        best, _ = compress(update, 3)
        U, S_full, Vh = torch.linalg.svd(dense)
        torch.testing.assert_close((best.B @ best.A).double(), U[:, :3] * S_full[:3] @ Vh[:3], atol=1e-5, rtol=0)
    assert report["max_relative_error"] == pytest.approx(max(errors.values()))


def test_resume_mid_stage_matches_an_uninterrupted_run(hub):
    _, whole, plora_whole, history_whole, _ = _train(hub, "whole", steps=10)
    _train(hub, "killed", steps=10, stop_at=6)
    # killed after stage 2 was unloaded and recorded (step 6) but before its checkpoint was written:
    shutil.rmtree(hub / "killed" / "checkpoints" / "step-000006")
    assert len(read_stages(hub / "killed" / "plora")) == 2  # resume from step 4 (mid-stage 2) must drop stage 2 and redo it
    _, resumed, plora_resumed, history_resumed, _ = _train(hub, "killed", steps=10, resume=True)
    assert len(plora_resumed.stages) == len(plora_whole.stages) == 3
    assert [m["lr"] for m in history_resumed] == [m["lr"] for m in history_whole[4:]]
    for (_, a), (_, b) in zip(whole.lora_layers(), resumed.lora_layers()):
        torch.testing.assert_close(a.weight_view(), b.weight_view(), atol=1e-6, rtol=0)
        torch.testing.assert_close(a.lora_A["default"], b.lora_A["default"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a.lora_B["default"], b.lora_B["default"], atol=1e-6, rtol=0)
    assert [s.step for s in read_stages(hub / "killed" / "plora")] == [3, 6, 9]


def test_hf_trainer_callback_unloads(hub, tmp_path):
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    from lorakit.methods.plora.callback import PLoRACallback

    model, tokenizer = base_models.load(hub / "model")
    lora = get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = _weights(lora)
    plora = PeriodicLoRA(lora, PLoRAConfig(unload_every=8))  # 2 steps of 4
    args = TrainingArguments(str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1, warmup_steps=1)
    collator = lambda batch: {k: v for k, v in examples.collate(batch, tokenizer.pad_token_id).items() if k != "position_ids"}  # noqa: E731
    trainer = HFTrainer(model=lora, args=args, train_dataset=_items(tokenizer, 24), data_collator=collator, callbacks=[PLoRACallback(plora)])
    trainer.train()
    assert [s.step for s in plora.stages] == [2, 4]
    for key, (path, layer) in zip(plora.layers, lora.lora_layers()):
        torch.testing.assert_close(layer.weight_view(), before[path] + plora.total_delta(key), atol=1e-6, rtol=0)
    lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert lrs[0] == lrs[2] == lrs[4]  # the schedule restarts with each stage


def test_plora_refuses_svd_inits_and_bad_settings():
    _, lora = _lora(init_lora_weights="pissa", svd_cache=False)
    with pytest.raises(LoraConfigError, match="init_lora_weights=True"):
        PeriodicLoRA(lora, PLoRAConfig())
    with pytest.raises(LoraConfigError, match="momentum"):
        PLoRAConfig(momentum=1.0)
    with pytest.raises(LoraConfigError, match="optimizer_state"):
        PLoRAConfig(optimizer_state="zero")


def test_recipe_and_cli_for_a_plora_run(tmp_path):
    from offline_fixtures import multiple_choice_task, write_fake_bigbench

    write_tiny_model(tmp_path / "model")
    write_fake_bigbench(tmp_path / "cache", {"parity": multiple_choice_task(60)})
    run = tmp_path / "run"
    env = os.environ | {"LORAKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "lorakit.cli"]
    overrides = [f"model.name={tmp_path / 'model'}", "data.source=bigbench:parity", "data.test_size=8", "data.validation_size=4",
                 "lora.r=2", "lora.target_modules=[q_proj, v_proj]", f"training.output_dir={run}", "training.steps=6",
                 "training.batch_size=4", "training.method=plora", "plora.unload_every=8", "plora.momentum=0.2",
                 "training.eval_every=0", "training.save_every=3", "training.max_length=32"]
    subprocess.run([*cli, "train", *overrides], check=True, env=env, capture_output=True, timeout=600)
    assert len(list((run / "plora").glob("stage-*.safetensors"))) == 3
    assert re.search(r"PLoRA unloads\s*\| 3, ", (run / "summary.md").read_text())
    assert (run / "adapter_for_original_base" / "adapter_config.json").is_file()
    out = subprocess.run([*cli, "export-plora", str(run), "--rank", "2"], check=True, env=env, capture_output=True, text=True).stdout
    assert "relative error" in out and (run / "adapter_total_r2" / "adapter_model.safetensors").is_file()
    info = subprocess.run([*cli, "info", str(run), "--compare", str(run)], check=True, env=env, capture_output=True, text=True).stdout
    assert "PLoRA stages: 3" in info and (run / "update_diagnostics.png").is_file()
