"""Packed batches: the loss and gradients of packed rows equal those of the same items padded, for Llama and
GPT-2 (each item attends to itself only); rows are filled correctly; length grouping is a seeded permutation."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import VOCAB, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import LoraConfig, get_lora_model
from lorakit.core.examples import IGNORE_INDEX
from lorakit.core.packing import collate_packed, pack_rows
from lorakit.training.objectives import CompletionObjective, PackedCompletionObjective, check_packing
from lorakit.training.trainer import batch_indices, epoch_order

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def random_items(count: int, seed: int, longest: int = 30) -> list[dict]:
    """Items of different lengths: one to three turns, each a prompt (no labels) and an answer of 1-6 tokens."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        ids, labels = [], []
        for _ in range(rng.randint(1, 3)):
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, longest // 3 - 6))]
            answer = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 6))]
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        items.append({"input_ids": ids, "labels": labels})
    return items


def loss_and_gradients(model, objective, items) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = objective.loss_sum(model, items, "cpu")
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(family, attention):
    model = make_model(family)
    model.config._attn_implementation = attention
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False))
    items = random_items(12, seed=3)
    packed_batch = collate_packed(items, 0, 64)
    assert packed_batch["input_ids"].shape[0] < len(items)  # several items share a row
    padded_loss, padded_grads = loss_and_gradients(lora, CompletionObjective(0), items)
    packed_loss, packed_grads = loss_and_gradients(lora, PackedCompletionObjective(0, 64), items)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 0
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    check_packing(lora, items[:2], 0, "cpu")  # the run-time check passes for a model that confines attention


def test_an_item_never_sees_its_row_neighbours():
    """Changing one item changes no other item's log-probabilities in the packed row."""
    from lorakit.core.packing import packed_logprobs

    model = make_model("llama")
    items = random_items(6, seed=5)
    before, _ = packed_logprobs(model, collate_packed(items, 0, 200))
    changed = [dict(item) for item in items]
    changed[0] = {"input_ids": [7] * len(items[0]["input_ids"]), "labels": [IGNORE_INDEX] * len(items[0]["input_ids"])}
    after, _ = packed_logprobs(model, collate_packed(changed, 0, 200))
    assert collate_packed(items, 0, 200)["input_ids"].shape[0] == 1  # all six share one row
    torch.testing.assert_close(after.sum(), before.sum() - packed_logprobs(model, collate_packed(items[:1], 0, 200))[0].sum(),
                               rtol=1e-5, atol=1e-5)


def test_collated_rows_restart_positions_and_drop_first_labels():
    items = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    batch = collate_packed(items, 0, 8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    two_rows = collate_packed(items, 0, 4)
    assert two_rows["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and two_rows["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=40), st.integers(8, 64))
def test_pack_rows_places_every_item_once_within_capacity(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= capacity or len(row) == 1
    assert len(rows) <= max(1, 2 * -(-sum(lengths) // capacity))  # first fit: at most twice the optimum


@settings(max_examples=50, deadline=None)
@given(st.integers(4, 300), st.integers(1, 16), st.integers(0, 5), st.integers(0, 3))
def test_length_grouping_is_a_seeded_permutation_of_similar_lengths(n_items, batch_size, seed, epoch):
    lengths = [random.Random(i * 7 + seed).randint(1, 500) for i in range(n_items)]
    order = epoch_order(n_items, seed, epoch, batch_size, lengths)
    assert sorted(order) == list(range(n_items)) and order == epoch_order(n_items, seed, epoch, batch_size, lengths)
    assert epoch_order(n_items, seed, epoch, batch_size) == batch_indices_epoch(n_items, seed, epoch, batch_size)
    steps = n_items // batch_size
    if steps:
        padding = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)  # noqa: E731
        grouped = [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
        plain = [batch_indices(n_items, seed, epoch * steps + s, batch_size) for s in range(steps)]
        assert padding(grouped) <= padding(plain)
        assert [batch_indices(n_items, seed, epoch * steps + s, batch_size, lengths) for s in range(steps)] == grouped


def batch_indices_epoch(n_items, seed, epoch, batch_size):
    """The pre-grouping order: one seeded shuffle per epoch (what every earlier run trained in)."""
    order = list(range(n_items))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def _chat_rows(count: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(count):
        turns = [{"role": "system", "content": "Say yes or no."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(0, 10**rng.randint(1, 4))
            turns += [{"role": "user", "content": f"{n} even?"}, {"role": "assistant", "content": "yes" if n % 2 == 0 else "no"}]
        rows.append({"messages": turns})
    return rows


def test_packed_chat_run_trains_the_adapter_an_unpacked_run_trains(workspace, tmp_path):
    """Multi-turn chat data through `lorakit train`: packed (and length-grouped) runs end with the adapter of the padded
    run; packing refuses what it cannot carry, before loading anything."""
    import json
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file
    from test_train import _env

    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in _chat_rows(60)))

    def train(name: str, *overrides: str) -> subprocess.CompletedProcess:
        config = {"model": {"name": str(workspace / "model")}, "data": {"source": str(source), "test_size": 8, "validation_size": 4},
                  "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
                  "training": {"output_dir": str(tmp_path / name), "steps": 6, "batch_size": 8, "grad_accum": 2, "lr": 0.01,
                               "eval_every": 3, "save_every": 0, "max_length": 64}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(path), *overrides], env=_env(workspace),
                              capture_output=True, text=True, timeout=600)

    for name, overrides in [("padded", ()), ("packed", ("training.packing=true",))]:
        result = train(name, *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
    padded, packed = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("padded", "packed"))
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-5, msg=key)
    assert train("grouped", "training.group_by_length=true").returncode == 0
    for overrides, message in [(("training.method=prompt_tuning",), "prompt_tuning adds tokens"),
                               (("model.task=classification",), "a classifier reads one item per row")]:
        result = train("refused", "training.packing=true", *overrides)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
