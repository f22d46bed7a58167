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
from test_train import _config_file, _env, _train_cli, workspace  # noqa: F401  (the module's tiny model and data)

METHODS = ["ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "lst"]
PEFT_TYPES = {"ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING", "lst": "LST"}
OVERRIDES = {"lst": ["lst.reduction_factor=2"]}  # the tiny model's heads are 8 wide: r=8 would not divide their rotary pairs


def _cli(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], env=_env(root), capture_output=True, text=True, timeout=600)


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
    stopped = workspace / f"stopped-{method}"
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "adapter")
    for checkpoint in (stopped / "checkpoints").iterdir():
        if checkpoint.name != "step-000002":
            shutil.rmtree(checkpoint)
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
