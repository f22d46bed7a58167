"""LoraHub: composition against dense maths, batched population loss == one-by-one loss (the official
code's way: write the composed state dict, one full forward per candidate), bounds, L1, seeds, causal
and seq2seq, mismatched modules, merge, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from offline_fixtures import tiny_tokenizer, write_tiny_model
from transformers import T5Config, T5ForConditionalGeneration

from lorakit import (
    LoraConfig,
    LoraConfigError,
    LoraLayer,
    LoraModel,
    base_models,
    get_lora_model,
    lorahub,
)
from lorakit.core.examples import IGNORE_INDEX, Example, collate, tokenize_example
from lorakit.core.loading import apply_adapter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [Example(f"{a} plus {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (0, 3)]]
SHARED_START = [Example(f"Compute the sum, please: {ex.prompt}", ex.target) for ex in EXAMPLES]  # a prefix run once


def _modules(model_factory, targets, n=4, r=2, seed=0) -> list[lorahub.HubModule]:
    """n modules with random (non-zero) factors on fresh copies of the model."""
    modules = []
    for i in range(n):
        torch.manual_seed(seed + i)
        lora = get_lora_model(model_factory(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():
            for _, layer in lora.lora_layers():
                layer.lora_B["default"].mul_(0.3)
        modules.append(lorahub.as_module((lora, "default")))
    return modules


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    directory = write_tiny_model(tmp_path_factory.mktemp("hub") / "model")
    factory = lambda: base_models.load(directory)[0]  # noqa: E731
    return factory, base_models.load(directory)[1], _modules(factory, ["q_proj", "v_proj", "up_proj"]), directory


def _tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer()), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0)).eval()


def _reference_loss(model_factory, modules, weights, tokenizer, seq2seq=False, examples=EXAMPLES) -> float:
    """The official code's way: a fresh model, the composed state dict written in, one full forward."""
    composed = lorahub.compose(modules, weights)
    lora = LoraModel(model_factory())
    apply_adapter(lora, "composed", composed.config, composed.tensors, is_trainable=False)
    lora.set_adapter("composed")
    losses = []
    with torch.no_grad():
        for example in examples:
            if seq2seq:
                ids = torch.tensor([tokenizer(example.prompt)["input_ids"]])
                labels = torch.tensor([tokenizer(example.target)["input_ids"]])
                losses.append(float(lora(input_ids=ids, labels=labels).loss))
                continue
            batch = collate([tokenize_example(tokenizer, example.prompt, example.target, 256)], tokenizer.pad_token_id)
            logits = lora(input_ids=batch["input_ids"]).logits[0, :-1]  # all positions
            labels = batch["labels"][0, 1:]
            losses.append(float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)))
    return sum(losses) / len(losses)


def test_compose_is_the_factor_wise_weighted_sum(causal):
    _, _, modules, _ = causal
    weights = [0.7, -1.2, 0.0, 0.4]
    composed = lorahub.compose(modules, weights)
    for key, tensor in composed.tensors.items():
        expected = sum(w * m.tensors[key] for w, m in zip(weights, modules))
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0)
    key_A = next(k for k in composed.tensors if k.endswith("lora_A.weight"))
    key_B = key_A.replace("lora_A", "lora_B")
    delta = composed.tensors[key_B] @ composed.tensors[key_A]
    cross = sum(wi * wj * mi.tensors[key_B] @ mj.tensors[key_A]
                for wi, mi in zip(weights, modules) for wj, mj in zip(weights, modules))
    torch.testing.assert_close(delta, cross, atol=1e-5, rtol=0)  # B@A includes every cross term B_i@A_j
    assert not torch.allclose(delta, sum(w * m.tensors[key_B] @ m.tensors[key_A] for w, m in zip(weights, modules)), atol=1e-3)


@pytest.mark.parametrize("examples", [EXAMPLES, SHARED_START], ids=["distinct", "shared-prefix"])
@pytest.mark.parametrize("population", [1, 3])
def test_population_loss_equals_one_by_one_causal(causal, examples, population):
    factory, tokenizer, modules, _ = causal
    model = factory()
    candidates = torch.tensor([[1.0, -0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.5, 1.5, 0.2, 0.9]])[:population]
    with lorahub.HubObjective(model, modules, examples, tokenizer, population=population, batch_rows=7) as objective:  # chunks cross candidates
        assert (objective.prefix > 0) == (examples is SHARED_START)
        batched = objective.population_loss(candidates)
    for w, loss in zip(candidates.tolist(), batched):
        assert loss == pytest.approx(_reference_loss(factory, modules, w, tokenizer, examples=examples), abs=1e-5)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # the candidates are gone


def test_population_loss_equals_one_by_one_seq2seq():
    tokenizer = tiny_tokenizer()
    modules = _modules(_tiny_t5, ["q", "v"], n=3)
    candidates = torch.tensor([[0.5, 0.5, -0.5], [1.0, 0.0, 0.2]])
    objective = lorahub.HubObjective(_tiny_t5(), modules, EXAMPLES, tokenizer, population=2)
    batched = objective.population_loss(candidates)
    objective.close()
    for w, loss in zip(candidates.tolist(), batched):
        assert loss == pytest.approx(_reference_loss(_tiny_t5, modules, w, tokenizer, seq2seq=True), abs=1e-5)


def test_learn_matches_the_one_by_one_search(causal):
    factory, tokenizer, modules, _ = causal
    result = lorahub.learn(factory(), modules, EXAMPLES, tokenizer, budget=12, optimizer="CMA", seed=3, progress=False)
    search = lorahub.make_optimizer("CMA", len(modules), 12, (-1.5, 1.5), 3, lorahub.default_population("CMA", len(modules)))
    reference = []
    while len(reference) < 12:  # ask a population, evaluate one by one with state-dict writes, tell
        asked = [search.ask() for _ in range(min(search.num_workers, 12 - len(reference)))]
        for candidate in asked:
            fit = _reference_loss(factory, modules, list(candidate.value), tokenizer)
            value = fit + 0.05 * float(abs(candidate.value).mean())
            assert lorahub.penalised_objective(fit, candidate.value, lam=0.05) == pytest.approx(value, abs=1e-12)
            search.tell(candidate, value)
            reference.append(value)
    assert result.losses == pytest.approx(reference, abs=1e-5)
    assert result.weights == pytest.approx(list(search.provide_recommendation().value), abs=1e-6)


@pytest.mark.parametrize("optimizer", ["NGOpt", "CMA"])
def test_best_single_start_scans_each_module_then_searches_from_the_best(causal, monkeypatch, optimizer):
    factory, tokenizer, modules, _ = causal
    asked = []
    original = lorahub.HubObjective.population_loss
    monkeypatch.setattr(lorahub.HubObjective, "population_loss", lambda self, w: asked.append(w.clone()) or original(self, w))
    result = lorahub.learn(factory(), modules, EXAMPLES, tokenizer, budget=8, optimizer=optimizer, seed=1, start="best-single", progress=False)
    n = len(modules)
    torch.testing.assert_close(asked[0], torch.eye(n))  # the scan: every module alone, one batched forward
    alone = [_reference_loss(factory, modules, row, tokenizer) + 0.05 / n for row in torch.eye(n).tolist()]
    assert result.losses[:n] == pytest.approx(alone, abs=1e-5) and len(result.losses) == n + 8
    chosen = min(range(n), key=alone.__getitem__)
    if optimizer == "NGOpt":  # a one-at-a-time search asks its start first: the best module alone
        assert asked[1].tolist() == [torch.eye(n)[chosen].tolist()]
    found = _reference_loss(factory, modules, result.weights, tokenizer) + 0.05 * sum(map(abs, result.weights)) / n
    assert found <= alone[chosen] + 1e-5  # never worse than the module it started from
    zero = lorahub.learn(factory(), modules, EXAMPLES, tokenizer, budget=8, optimizer=optimizer, seed=1, progress=False)
    assert len(zero.losses) == 8 and zero.losses != result.losses[n:]


def test_bounds_l1_and_seeds(causal, monkeypatch):
    factory, tokenizer, modules, _ = causal
    asked = []
    original = lorahub.HubObjective.population_loss
    monkeypatch.setattr(lorahub.HubObjective, "population_loss", lambda self, w: asked.append(w.clone()) or original(self, w))
    run = lambda **kw: lorahub.learn(factory(), modules, EXAMPLES, tokenizer, budget=10, progress=False, **kw)  # noqa: E731
    bounded = run(bounds=(-0.2, 0.3), optimizer="CMA", seed=0)
    assert all(float(w.min()) >= -0.2 and float(w.max()) <= 0.3 for w in asked)
    assert min(bounded.weights) >= -0.2 and max(bounded.weights) <= 0.3
    again = run(bounds=(-0.2, 0.3), optimizer="CMA", seed=0)
    assert again.weights == bounded.weights and again.losses == bounded.losses
    assert run(bounds=(-0.2, 0.3), optimizer="CMA", seed=1).weights != bounded.weights
    heavy = run(lam=100.0, seed=0)  # the L1 term dominates: w = 0 (the start) wins
    assert max(abs(w) for w in heavy.weights) < 1e-3
    free = run(lam=0.0, seed=0)
    assert max(abs(w) for w in free.weights) > 1e-3
    assert bounded.best_losses == sorted(bounded.best_losses, reverse=True)


def test_merge_folds_the_composition_in(causal):
    factory, tokenizer, modules, _ = causal
    result = lorahub.learn(factory(), modules, EXAMPLES, tokenizer, budget=6, merge=True, progress=False)
    reference = LoraModel(factory())
    apply_adapter(reference, "x", result.module.config, result.module.tensors, is_trainable=False)
    reference.set_adapter("x")
    ids = torch.randint(3, 20, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(result.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not any(isinstance(m, LoraLayer) for m in result.model.modules())


def test_mismatched_modules_are_named(causal):
    factory, _, modules, _ = causal
    other_rank = _modules(factory, ["q_proj", "v_proj", "up_proj"], n=1, r=3)[0]
    with pytest.raises(LoraConfigError, match=r"does not fit .*lora_A.weight'? is \(3, 32\), not \(2, 32\)"):
        lorahub.compose([modules[0], other_rank], [1.0, 1.0])
    other_targets = _modules(factory, ["q_proj", "v_proj"], n=1)[0]
    with pytest.raises(LoraConfigError, match="has no .*up_proj"):
        lorahub.compose([modules[0], other_targets], [1.0, 1.0])
    with pytest.raises(LoraConfigError, match="one weight per module"):
        lorahub.compose(modules, [1.0])
    with pytest.raises(LoraConfigError, match="not a nevergrad optimiser"):
        lorahub.make_optimizer("NoSuchOpt", 3, 10, (-1, 1), 0, 1)


def test_hub_cli_learns_and_writes_a_peft_adapter(causal, tmp_path):
    factory, _, modules, model_dir = causal
    dirs = []
    for i, module in enumerate(modules):
        module.save(tmp_path / f"module{i}")
        dirs.append(str(tmp_path / f"module{i}"))
    examples = tmp_path / "few.jsonl"
    examples.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.target}) + "\n" for e in EXAMPLES))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "lorahub", "learn", "--modules", *dirs, "--examples", str(examples),
                          "--model", str(model_dir), "--budget", "8", "--optimizer", "CMA", "--start", "best-single", "--out", str(tmp_path / "composed")],
                         check=True, env=env, capture_output=True, text=True).stdout
    assert "weights:" in out
    record = json.loads((tmp_path / "composed" / "lorahub.json").read_text())
    assert len(record["weights"]) == 4 and (tmp_path / "composed" / "lorahub.png").is_file()
    assert record["start"] == "best-single" and len(record["losses"]) == 4 + 8  # each module alone, then the search
    composed = lorahub.compose(dirs, record["weights"])
    peft_model = peft.PeftModel.from_pretrained(factory(), tmp_path / "composed")
    ours = LoraModel(factory())
    apply_adapter(ours, "x", composed.config, composed.tensors, is_trainable=False)
    ours.set_adapter("x")
    ids = torch.randint(3, 20, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_lorahub_searches_and_merges_on_a_quantised_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    directory = write_tiny_model(tmp_path / "model", hidden=128)  # bitsandbytes quantises in blocks of 64
    factory = lambda: base_models.load(directory, quantization="nf4")[0]  # noqa: E731
    tokenizer = base_models.load(directory)[1]
    modules = _modules(factory, ["q_proj", "v_proj"], n=3)
    base = factory()
    ids = torch.randint(3, 20, (2, 9))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    result = lorahub.learn(base, modules, EXAMPLES, tokenizer, budget=6, lam=0.0, progress=False)
    with torch.no_grad():  # the quantised base comes back unchanged
        torch.testing.assert_close(base(input_ids=ids).logits, before, atol=0, rtol=0)
    assert max(abs(w) for w in result.weights) > 1e-3
    merged = lorahub.learn(factory(), modules, EXAMPLES, tokenizer, budget=6, lam=0.0, merge=True, progress=False)
    reference = LoraModel(factory())  # the composed adapter beside the quantised weights, unmerged
    apply_adapter(reference, "x", merged.module.config, merged.module.tensors, is_trainable=False)
    reference.set_adapter("x")
    with torch.no_grad():  # merged: a dequantised model, equal up to the base's bf16 compute
        expected = reference(input_ids=ids).logits
        torch.testing.assert_close(merged.model(input_ids=ids).logits, expected, atol=5e-2, rtol=5e-2)
    assert (expected - before).abs().max() > 0.2  # the composed update is far larger than that tolerance
