"""Training: schedules, exact resume after SIGKILL, NaN stop, checkpoint atomicity, 2-process DDP,
CLI config errors, and transformers.Trainer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from offline_fixtures import slowed_cli, tiny_trainer
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraConfigError, base_models, get_lora_model
from lorakit.core import examples
from lorakit.training.recipe import load_run_config
from lorakit.training.trainer import (
    TrainingConfig,
    TrainingDivergedError,
    batch_indices,
    latest_checkpoint,
    lr_lambda,
)

ROOT = Path(__file__).resolve().parents[1]


def _config_file(workspace: Path, name: str, **training) -> Path:
    config = {
        "model": {"name": str(workspace / "model")},
        "data": {"source": "bigbench:parity", "test_size": 16, "validation_size": 8},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1},
        "training": {"output_dir": str(workspace / name), "steps": 8, "batch_size": 4, "lr": 0.01, "warmup_steps": 2,
                     "eval_every": 4, "save_every": 2, "max_length": 32, "eval_batch_size": 8} | training,
    }
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(workspace: Path) -> dict:
    return os.environ | {"LORAKIT_CACHE": str(workspace / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train_cli(workspace: Path, config: Path, *extra: str, launcher=(sys.executable, "-m", "lorakit.cli")) -> None:
    result = subprocess.run([*launcher, "train", str(config), *extra], env=_env(workspace), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_schedule_and_batches():
    config = TrainingConfig(steps=10, warmup_steps=2, schedule="linear")
    factors = [lr_lambda(config)(s) for s in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    cosine = TrainingConfig(steps=10, warmup_steps=0)
    assert lr_lambda(cosine)(0) == 1.0 and lr_lambda(cosine)(5) == pytest.approx(0.5)
    epoch = [i for step in range(5) for i in batch_indices(20, 0, step, 4)]
    assert sorted(epoch) == list(range(20)) and batch_indices(20, 0, 7, 4) == batch_indices(20, 0, 7, 4)


def test_run_writes_outputs_and_learns(workspace):
    _train_cli(workspace, _config_file(workspace, "full", steps=30))
    run = workspace / "full"
    assert {"metrics.jsonl", "loss.png", "summary.md", "config.yaml", "adapter"} <= {p.name for p in run.iterdir()}
    lines = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 31)) and "eval_loss" in lines[3]
    assert lines[-1]["loss"] < lines[0]["loss"]
    summary = (run / "summary.md").read_text()
    assert "zero-shot accuracy" in summary and "fine-tuned accuracy" in summary and "peak memory" in summary
    samples = re.findall(r"\*\*\d\.\*\* (.*)\n\n- expected: (.*)\n- before fine-tuning: (.*)\n- after fine-tuning: (.*)", summary)
    assert len(samples) == 2, summary
    from lorakit import base_models
    from lorakit.methods.peft_methods import load_peft_model
    from lorakit.training.generation import Sampling, generate_answers

    model, tokenizer = base_models.load(workspace / "model")
    for adapter, column in ((None, 2), (run / "adapter", 3)):
        speaker = load_peft_model(model, adapter) if adapter else model
        answers = generate_answers(speaker.eval(), tokenizer, [[("user", prompt)] for prompt, *_ in samples], Sampling(max_new_tokens=48))
        assert [sample[column] for sample in samples] == [" ".join(answer.split()) or "(empty)" for answer in answers]  # one line each


def test_resume_after_sigkill_matches_uninterrupted_run(workspace):
    _train_cli(workspace, _config_file(workspace, "straight"))
    config = _config_file(workspace, "killed")
    # Slow each step down from the outside (the product is untouched) so the kill lands mid-run.
    process = subprocess.Popen([sys.executable, "-c", slowed_cli(["train", str(config)], 0.4)], env=_env(workspace), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = workspace / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (checkpoints / "step-000004").exists() and not (workspace / "killed" / "adapter").exists()
    _train_cli(workspace, config, "--resume")
    straight, resumed = _adapter(workspace / "straight"), _adapter(workspace / "killed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0, msg=key)
    zero_shot = [line for line in (workspace / "straight" / "summary.md").read_text().splitlines() if "zero-shot" in line or "before" in line]
    assert zero_shot and zero_shot == [line for line in (workspace / "killed" / "summary.md").read_text().splitlines()
                                       if "zero-shot" in line or "before" in line]  # kept from before the kill


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed one can still be held by an earlier run's socket)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RUNS = ["lora", "plora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "lst", "lora+checkpointing",
        "lora+fsdp", "ia3+fsdp", "prompt_tuning+fsdp", "lst+fsdp", "lora+fsdp+checkpointing"]


@pytest.mark.parametrize("run", RUNS)
def test_two_processes_match_one_process(workspace, run):
    """DDP (replicated base) and FSDP (training.fsdp: the frozen base sharded) over 2 gloo processes train the
    adapter a 1-process run trains, with and without activation checkpointing."""
    method, *options = run.split("+")
    # no dropout: its masks depend on how rows are spread over processes; PLoRA unloads every 2 steps
    settings = ["lora.lora_dropout=0.0", f"training.method={method}", "plora.unload_every=8", "lst.reduction_factor=2",
                f"training.gradient_checkpointing={str('checkpointing' in options).lower()}"]
    _train_cli(workspace, _config_file(workspace, f"one-{run}", steps=5), *settings)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "lorakit.cli")
    _train_cli(workspace, _config_file(workspace, f"two-{run}", steps=5), *settings, f"training.fsdp={str('fsdp' in options).lower()}",
               launcher=launcher)
    summary = (workspace / f"two-{run}" / "summary.md").read_text()
    share = re.search(r"\| processes +\| 2 \((DDP|FSDP), (?:(\d+)% of the weights|the whole model) on each\)", summary)
    assert share and share[1] == ("FSDP" if "fsdp" in options else "DDP"), summary
    if "fsdp" in options:  # each process holds half the frozen weights and all the trained ones
        trained = re.search(r"\| trainable parameters \| ([\d,]+) of ([\d,]+)", summary)
        fraction = int(trained[1].replace(",", "")) / int(trained[2].replace(",", ""))
        assert abs(int(share[2]) / 100 - (fraction + (1 - fraction) / 2)) <= 0.02, summary
    weights = "lst_model.safetensors" if method == "lst" else "adapter_model.safetensors"
    for folder in ["adapter"] + (["adapter_for_original_base"] if method == "plora" else []):
        one = load_file(workspace / f"one-{run}" / folder / weights)
        two = load_file(workspace / f"two-{run}" / folder / weights)
        for key in one:  # same global batch; only the order of float sums differs
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workspace, tmp_path):
    trainer = tiny_trainer(workspace / "model", tmp_path)
    trainer.train_step(), trainer.train_step()
    good = trainer.save_checkpoint()
    with torch.no_grad():
        next(trainer.module.lora_layers())[1].lora_B["default"].fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3.*step-000002"):
        trainer.train_step()
    assert latest_checkpoint(tmp_path) == good and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_interrupted_checkpoint_write_is_ignored(workspace, tmp_path, monkeypatch):
    trainer = tiny_trainer(workspace / "model", tmp_path)
    trainer.train_step()
    first = trainer.save_checkpoint()
    trainer.train_step()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path) == first and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_config_errors_name_the_closest_key(tmp_path):
    with pytest.raises(LoraConfigError, match=r"unknown config key 'training.setps'. Did you mean 'training.steps'"):
        load_run_config(None, ["training.setps=3"])
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 4\n")
    with pytest.raises(LoraConfigError, match="Did you mean 'lora.r'"):
        load_run_config(path)
    path.write_text("trainig:\n  steps: 4\n")
    with pytest.raises(LoraConfigError, match="Did you mean 'training'"):
        load_run_config(path)
    assert load_run_config(None, ["training.steps=7", "lora.r=2"]).training.steps == 7


def test_cli_reports_config_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "training.lrr=1"], capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Did you mean 'training.lr'" in result.stderr and "Traceback" not in result.stderr


def test_hf_trainer_trains_a_lora_model(workspace, tmp_path):
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    model, tokenizer = base_models.load(workspace / "model")
    lora_model = get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    items = [examples.tokenize_example(tokenizer, f"{i} even?", "yes" if i % 2 == 0 else "no", 32) for i in range(16)]
    before = {k: v.clone() for k, v in lora_model.state_dict().items() if "lora_B" in k}
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1)
    collator = lambda batch: {k: v for k, v in examples.collate(batch, tokenizer.pad_token_id).items() if k != "position_ids"}  # noqa: E731
    HFTrainer(model=lora_model, args=args, train_dataset=items, data_collator=collator).train()
    after = {k: v for k, v in lora_model.state_dict().items() if "lora_B" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fresh_run_refuses_a_used_output_dir(workspace):
    config = _config_file(workspace, "used", steps=2)
    _train_cli(workspace, config)
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(config)], env=_env(workspace), capture_output=True, text=True)
    assert result.returncode == 2 and "holds an earlier run" in result.stderr and "--resume" in result.stderr


def test_gradient_accumulation_matches_one_big_batch(workspace, tmp_path):
    results = []
    for accumulation in (1, 2):
        torch.manual_seed(0)
        trainer = tiny_trainer(workspace / "model", tmp_path / f"acc{accumulation}", grad_accum=accumulation)
        for _ in range(3):
            trainer.train_step()
        results.append({k: v.detach().clone() for k, v in trainer.module.state_dict().items() if "lora_" in k})
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-6, rtol=1e-5, msg=key)


def test_eval_command_prints_accuracy(workspace):
    command = [sys.executable, "-m", "lorakit.cli", "eval", "--model", str(workspace / "model"), "--data", "bigbench:parity",
               "--test-size", "10", "--validation-size", "0"]
    result = subprocess.run(command, env=_env(workspace), capture_output=True, text=True, check=True)
    report = yaml.safe_load(result.stdout)
    assert set(report) == {"accuracy", "majority", "items"} and report["items"] == 10 and 0 <= report["accuracy"] <= 1


def test_fsdp_refuses_methods_that_rewrite_or_read_the_whole_base(workspace, tmp_path):
    from lorakit import LoraConfig

    with pytest.raises(LoraConfigError, match=r"PiSSA/MiLoRA.*training.fsdp: false"):
        tiny_trainer(workspace / "model", tmp_path / "pissa", lora=LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
                     fsdp=True)
    config = _config_file(workspace, "plora-fsdp", steps=4)
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(config), "training.method=plora", "training.fsdp=true",
                             "plora.unload_every=8"], env=_env(workspace), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "PLoRA unloads the adapter into the base weights" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs (accelerate's multi-GPU launch)")
def test_fsdp_on_gpus_matches_one_process(workspace):
    """The documented GPU launch: accelerate's multi-GPU launcher (NCCL) with training.fsdp."""
    settings = ["lora.lora_dropout=0.0", "training.precision=bf16"]
    _train_cli(workspace, _config_file(workspace, "gpu-one", steps=5), *settings)
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", f"--main_process_port={_free_port()}",
                "-m", "lorakit.cli")
    _train_cli(workspace, _config_file(workspace, "gpu-two", steps=5), *settings, "training.fsdp=true", launcher=launcher)
    assert "FSDP" in (workspace / "gpu-two" / "summary.md").read_text()
    one, two = _adapter(workspace / "gpu-one"), _adapter(workspace / "gpu-two")
    for key in [k for k in one if "lora_B" in k]:
        assert one[key].norm() > 0 and (two[key] - one[key]).norm() <= 0.02 * one[key].norm(), key
