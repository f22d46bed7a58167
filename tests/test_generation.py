"""`lorakit generate` and `lorakit chat` against greedy decoding by hand: every adapter kind, several adapters side by
side in one call, and the chat loop driven through its standard input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_train import _env

from lorakit import LoraConfig, base_models
from lorakit.methods.ia3.config import IA3Config
from lorakit.methods.lst.config import LSTConfig
from lorakit.methods.lst.model import LSTModel
from lorakit.methods.peft_methods import get_peft_model, load_peft_model
from lorakit.methods.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

NEW_TOKENS = 6
KINDS = {
    "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora2": LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ia3b": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4),
    "lst": LSTConfig(reduction_factor=2, init="random"),
}


@pytest.fixture(scope="module")
def adapters(workspace):
    """One saved adapter of each kind for the tiny model, with weights that change its answers."""
    folders = {}
    for seed, (name, config) in enumerate(KINDS.items()):
        model, _ = base_models.load(workspace / "model")
        torch.manual_seed(seed)
        wrapped = LSTModel(model, config) if name == "lst" else get_peft_model(model, config)
        with torch.no_grad():
            for parameter in (p for p in wrapped.parameters() if p.requires_grad):
                parameter.add_(torch.randn_like(parameter) * (0.5 if name.startswith("ia3") else 0.3))
        wrapped.save_pretrained(workspace / "adapters" / name)
        folders[name] = workspace / "adapters" / name
    return folders


def by_hand(workspace, folder, conversation) -> str:
    """Greedy answer of the base model with the adapter in `folder` (none: the base), one conversation alone."""
    model, tokenizer = base_models.load(workspace / "model")
    if folder is not None:
        model = load_peft_model(model, folder)
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in conversation], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def lorakit(workspace, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lorakit.cli", *args, "--model", str(workspace / "model"), "--max-new-tokens", str(NEW_TOKENS)]
    return subprocess.run(command, env=_env(workspace), input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_with_each_adapter_kind(workspace, adapters, kind):
    result = lorakit(workspace, "generate", "12 even?", "--adapter", str(adapters[kind]))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = by_hand(workspace, adapters[kind], [("user", "12 even?")])
    assert result.stdout.strip() == expected
    assert expected != by_hand(workspace, None, [("user", "12 even?")]) or kind.startswith("ia3")


def test_several_adapters_answer_side_by_side(workspace, adapters):
    """Two LoRA adapters (one mixed batch), two IA3 adapters (another), a prompt-tuning adapter and an LST side network."""
    names = ["lora", "lora2", "ia3", "ia3b", "prompt", "lst"]
    result = lorakit(workspace, "generate", "7 even?", *[f for n in names for f in ("--adapter", f"{n}={adapters[n]}")])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split("]")[0][1:] for line in lines] == names
    for name, line in zip(names, lines):
        assert line == f"[{name}] {by_hand(workspace, adapters[name], [('user', '7 even?')])}".rstrip(), name


def test_chat_keeps_history_per_adapter_and_resets(workspace, adapters):
    stdin = "2 even?\n3 even?\n/reset\n3 even?\n/help\n/exit\n5 even?\n"
    result = lorakit(workspace, "chat", "--adapter", f"a={adapters['lora']}", "--adapter", f"b={adapters['lora2']}", "--system", "Be brief.",
                     stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[4] == "(conversation cleared)" and lines[7].startswith("unknown command '/help'") and len(lines) == 8
    for offset, name in enumerate("ab"):
        folder = adapters["lora" if name == "a" else "lora2"]
        first = by_hand(workspace, folder, [("system", "Be brief."), ("user", "2 even?")])
        second = by_hand(workspace, folder, [("system", "Be brief."), ("user", "2 even?"), ("assistant", first), ("user", "3 even?")])
        fresh = by_hand(workspace, folder, [("system", "Be brief."), ("user", "3 even?")])
        assert [lines[i + offset] for i in (0, 2, 5)] == [f"[{name}] {answer}".rstrip() for answer in (first, second, fresh)]


def test_bad_talk_arguments_exit_2(workspace, adapters, tmp_path):
    for args, message in [(("generate", "x", "--adapter", str(tmp_path / "missing")), "is not a folder"),
                          (("generate", "x", "--adapter", f"a={adapters['lora']}", "--adapter", f"a={adapters['ia3']}"), "two adapters are named 'a'"),
                          (("generate", "x", "--temperature", "-1"), "--temperature -1.0"),
                          (("chat", "--adapter", str(tmp_path)), "adapter_config.json")]:
        result = lorakit(workspace, *args, stdin="")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr[-1500:])


def test_sampling_is_seeded_and_the_stream_is_the_answer(workspace, adapters):
    from lorakit.training.generation import Sampling, Speakers

    model, tokenizer = base_models.load(workspace / "model")
    speakers = Speakers(model, tokenizer, [("a", str(adapters["lora"]))])
    turns = {"a": [("user", "4 even?")]}
    sampled = [speakers.answer(turns, Sampling(max_new_tokens=8, temperature=1.5, seed=seed))["a"] for seed in (1, 1, 2)]
    pieces: list[str] = []
    greedy = speakers.answer(turns, Sampling(max_new_tokens=NEW_TOKENS), stream=pieces.append)["a"]
    assert sampled[0] == sampled[1] and greedy == by_hand(workspace, adapters["lora"], turns["a"]).strip()
    assert "".join(pieces).strip() == greedy and len(pieces) >= 1
    assert any(answer != greedy for answer in sampled)
