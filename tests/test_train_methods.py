"""IA3 and the prompt methods through `lorakit train`: the same run outputs as LoRA, exact resume, and the
eval / info / merge commands reading each method's adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import _config_file, _env, _train_cli

METHODS = ["ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "lst"]
PEFT_TYPES = {"ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING", "lst": "LST"}
OVERRIDES = {"lst": ["lst.reduction_factor=2"]}  # the tiny model's heads are 8 wide: r=8 would not divide their rotary pairs


def _cli(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], env=_env(root), capture_output=True, text=True, timeout=600)


def _stopped_after_step_2(run, stopped):
    """A copy of finished `run` as a run killed after its step-2 checkpoint would have left it."""
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "adapter")
    for checkpoint in (stopped / "checkpoints").iterdir():
        if checkpoint.name != "step-000002":
            shutil.rmtree(checkpoint)
    return stopped


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_from_the_cli_and_resumes_exactly(workspace, method):  # noqa: F811
    config = _config_file(workspace, f"run-{method}", steps=6, eval_every=3, save_every=2, method=method)
    _train_cli(workspace, config, *OVERRIDES.get(method, []))
    run = workspace / f"run-{method}"
    assert {"metrics.jsonl", "loss.png", "summary.md", "config.yaml", "adapter", "checkpoints"} <= {p.name for p in run.iterdir()}
    summary = (run / "summary.md").read_text()
    assert f"| method               | {method} |" in summary and "zero-shot accuracy" in summary and "fine-tuned accuracy" in summary
    saved = run / "adapter" / ("lst_config.json" if method == "lst" else "adapter_config.json")
    assert json.loads(saved.read_text()).get("peft_type", json.loads(saved.read_text()).get("method")) == PEFT_TYPES[method]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 7)) and "eval_loss" in history[2]

    # a run stopped after its step-2 checkpoint, resumed: the same adapter, bit for bit up to float noise
    stopped = _stopped_after_step_2(run, workspace / f"stopped-{method}")
    resumed_config = _config_file(workspace, f"stopped-{method}", steps=6, eval_every=3, save_every=2, method=method)
    _train_cli(workspace, resumed_config, *OVERRIDES.get(method, []), "--resume")
    weights = "lst_model.safetensors" if method == "lst" else "adapter_model.safetensors"
    straight, resumed = load_file(run / "adapter" / weights), load_file(stopped / "adapter" / weights)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0, msg=key)
    trained = load_file(stopped / "checkpoints" / "step-000006" / "trainable.safetensors")
    if method in ("p_tuning", "prefix_tuning"):  # the checkpoint keeps the encoder the saved adapter folds away
        assert any("mlp_head" in key or "transform" in key for key in trained)

    # eval and info read the adapter; merge refuses the prompt methods in one line
    evaluation = _cli(workspace, "eval", "--model", str(workspace / "model"), "--adapter", str(run / "adapter"),
                      "--data", "bigbench:parity", "--test-size", "10", "--validation-size", "0")
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert yaml.safe_load(evaluation.stdout)["items"] == 10
    info = _cli(workspace, "info", str(run / "adapter"))
    assert info.returncode == 0 and PEFT_TYPES[method] in info.stdout and "parameters" in info.stdout
    run_info = _cli(workspace, "info", str(run))
    assert run_info.returncode == 0 and "fine-tuned accuracy" in run_info.stdout and PEFT_TYPES[method] in run_info.stdout
    merged = _cli(workspace, "merge", str(run / "adapter"), "--model", str(workspace / "model"), "--out", str(workspace / f"merged-{method}"))
    if method == "ia3":
        assert merged.returncode == 0, merged.stderr[-2000:]
    elif method == "lst":
        assert merged.returncode == 2 and "nothing to merge" in merged.stderr and "Traceback" not in merged.stderr
    else:
        assert merged.returncode == 2 and "nothing to merge" in merged.stderr and "Traceback" not in merged.stderr
        assert not (workspace / f"merged-{method}").exists()


@pytest.mark.parametrize("method", ["lst", "lora"])
def test_a_classifier_trains_from_the_cli_resumes_exactly_and_evaluates(workspace, method):  # noqa: F811
    from offline_fixtures import write_tiny_encoder

    encoder = workspace / "encoder"
    if not encoder.exists():
        write_tiny_encoder(encoder)
    task = ["model.task=classification", f"model.name={encoder}", "lst.reduction_factor=2", "lora.target_modules=[query, value]"]
    config = _config_file(workspace, f"classify-{method}", steps=6, eval_every=3, save_every=2, method=method)
    _train_cli(workspace, config, *task)
    run = workspace / f"classify-{method}"
    summary = (run / "summary.md").read_text()
    assert "fine-tuned accuracy" in summary and "| test items           | 16 |" in summary
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 7)) and "eval_loss" in history[2]
    weights = "lst_model.safetensors" if method == "lst" else "adapter_model.safetensors"
    saved = load_file(run / "adapter" / weights)
    if method == "lst":  # the class logits come from the side network's own head
        assert "side.head.3.weight" in saved and saved["side.head.3.weight"].shape == (2, 16)
    else:  # LoRA trains the new classification head in full beside the adapter
        assert any(key.endswith("classifier.weight") for key in saved) and any("lora_A" in key for key in saved)

    stopped = _stopped_after_step_2(run, workspace / f"stopped-classify-{method}")
    _train_cli(workspace, _config_file(workspace, f"stopped-classify-{method}", steps=6, eval_every=3, save_every=2, method=method),
               *task, "--resume")
    resumed = load_file(stopped / "adapter" / weights)
    for key in saved:
        torch.testing.assert_close(resumed[key], saved[key], atol=1e-6, rtol=0, msg=key)

    evaluation = _cli(workspace, "eval", "--model", str(encoder), "--task", "classification", "--adapter", str(run / "adapter"),
                      "--data", "bigbench:parity", "--test-size", "16", "--validation-size", "8")
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    reported = yaml.safe_load(evaluation.stdout)
    assert reported["items"] == 16 and f"| fine-tuned accuracy  | {reported['accuracy']:.3f} |" in summary  # the run's own test split


def test_classification_classes_are_the_sorted_options_whatever_their_order_per_example():
    from lorakit.core.errors import DataError
    from lorakit.core.examples import Example
    from lorakit.training.tasks import task_for

    examples = [Example("a", "pos", ("pos", "neg"), 0), Example("b", "pos", ("neg", "pos"), 1), Example("c", "neg", ("neg", "pos"), 0),
                Example("d", "mixed", ("pos", "mixed", "neg"), 1)]
    task = task_for("classification", examples)
    assert task.classes == ("mixed", "neg", "pos") and task.num_labels == 3
    assert [task.label_of(ex) for ex in examples] == [2, 2, 1, 0]
    with pytest.raises(DataError, match="row 1 has no options"):
        task_for("classification", [examples[0], Example("e", "free text")])
    with pytest.raises(DataError, match="at least two"):
        task_for("classification", [Example("f", "x", ("x",), 0)])
    assert task_for("causal-lm", [Example("e", "free text")]).num_labels is None
