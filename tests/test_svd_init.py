"""PiSSA and MiLoRA: solvers against torch.linalg.svd (float64), output unchanged at init, export for the
original base loaded by PEFT, cache hit/miss/corruption, errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import logits, make_inputs, make_model
from offline_fixtures import write_tiny_model

from lorakit import LoraConfig, LoraModel, TargetModuleError, get_lora_model
from lorakit.core.svd import decompose
from lorakit.methods.residual import export_plain_lora, save_residual_model

SUBSPACE_BAR = 1e-4


def subspace_error(A: torch.Tensor, B: torch.Tensor) -> float:
    """sin of the largest principal angle between the column spaces of A and B."""
    Qa, _ = torch.linalg.qr(A.double())
    Qb, _ = torch.linalg.qr(B.double())
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1)
    return float(torch.sqrt(1 - cosines.min() ** 2))


def reference(W: torch.Tensor, r: int, largest: bool):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    pick = slice(0, r) if largest else slice(S.shape[0] - r, None)
    return U[:, pick], S[pick], Vh[pick].T


def _matrices():
    g = torch.Generator().manual_seed(0)
    yield "wide", torch.randn(24, 40, generator=g)
    yield "tall", torch.randn(40, 24, generator=g)
    decaying = torch.linalg.qr(torch.randn(32, 32, generator=g))[0] @ torch.diag(0.8 ** torch.arange(32.0)) @ torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    yield "decaying", decaying


@pytest.mark.parametrize("solver", ["exact", "gram"])
@pytest.mark.parametrize("largest", [True, False], ids=["pissa", "milora"])
@pytest.mark.parametrize("name,W", list(_matrices()), ids=[n for n, _ in _matrices()])
def test_solver_subspaces_match_full_svd(solver, largest, name, W):
    U, S, V = reference(W, 5, largest)
    parts = decompose(W, 5, largest, solver, cache=False)
    assert subspace_error(parts.U, U) <= SUBSPACE_BAR and subspace_error(parts.V, V) <= SUBSPACE_BAR
    torch.testing.assert_close(parts.S, S, atol=1e-8, rtol=1e-8)
    assert torch.all(parts.S[:-1] >= parts.S[1:])  # decreasing
    for basis in (parts.U, parts.V):
        torch.testing.assert_close(basis.T @ basis, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)


def test_randomized_solver_on_a_decaying_spectrum():
    _, W = list(_matrices())[2]
    U, _, V = reference(W, 4, True)
    parts = decompose(W, 4, True, "randomized", cache=False)
    assert subspace_error(parts.U, U) <= SUBSPACE_BAR and subspace_error(parts.V, V) <= SUBSPACE_BAR
    with pytest.raises(ValueError, match="largest singular components only"):
        decompose(W, 4, False, "randomized", cache=False)


def test_rank_deficient_and_repeated_values():
    g = torch.Generator().manual_seed(1)
    low_rank = torch.randn(30, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 20, generator=g, dtype=torch.float64)
    # MiLoRA on a rank-6 matrix: the 4 smallest singular values are 0; any orthonormal basis of the null
    # spaces is right, so check what defines them: orthonormal, W V = 0 and Wᵀ U = 0.
    parts = decompose(low_rank, 4, False, "gram", cache=False)
    assert parts.S.abs().max() < 1e-6
    torch.testing.assert_close(parts.V.T @ parts.V, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (low_rank @ parts.V).abs().max() < 1e-6 and (low_rank.T @ parts.U).abs().max() < 1e-6
    # Repeated singular values: the subspace of the top 3 (all equal) is unique, its basis is not.
    Q1, Q2 = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))[0]
    S = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    repeated = Q1[:, :9] @ torch.diag(S) @ Q2.T
    U, _, V = reference(repeated, 3, True)
    parts = decompose(repeated, 3, True, "gram", cache=False)
    assert subspace_error(parts.U, U) <= SUBSPACE_BAR and subspace_error(parts.V, V) <= SUBSPACE_BAR


@pytest.mark.parametrize("init", ["pissa", "milora", "pissa_niter_4"])
@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj", "down_proj", "embed_tokens"]), ("gpt2", ["c_attn", "c_proj"])])
def test_output_unchanged_at_init_and_residual_reconstructs(init, family, targets):
    inputs = make_inputs(family)
    base_model = make_model(family)
    original = {n: m.weight.detach().clone() for n, m in base_model.named_modules() if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor)}
    expected = logits(base_model, inputs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, svd_cache=False,
                        rank_pattern={"v_proj": 2, "c_proj": 3}, alpha_pattern={"down_proj": 3})
    threads = torch.get_num_threads()
    model = get_lora_model(base_model, config)
    assert torch.get_num_threads() == threads  # the init runs torch single-threaded, then gives the threads back
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    for path, layer in model.lora_layers():
        reconstructed = layer.weight_view() + layer.delta_weight("default")  # W_res + s·B@A, (out, in)
        stored_out_in = isinstance(layer.base_layer, torch.nn.Linear)  # Conv1D and Embedding store (in, out)
        torch.testing.assert_close(reconstructed, original[path] if stored_out_in else original[path].T, atol=1e-5, rtol=0)


def test_pissa_takes_largest_and_milora_smallest_components():
    model = make_model("llama")
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for init, largest in (("pissa", True), ("milora", False)):
        lora = get_lora_model(make_model("llama"), LoraConfig(r=4, lora_alpha=4, target_modules=["layers.0.self_attn.q_proj"], init_lora_weights=init, svd_cache=False))
        layer = next(layer for _, layer in lora.lora_layers())
        U, S, V = reference(W, 4, largest)
        assert subspace_error(layer.lora_B["default"].detach(), U) <= 1e-4 and subspace_error(layer.lora_A["default"].detach().T, V) <= 1e-4
        torch.testing.assert_close(torch.linalg.norm(layer.lora_B["default"].double(), dim=0) ** 2, S.float().double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("milora", True)])
def test_export_for_original_base_loads_in_peft(tmp_path, init, rslora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=init,
                        use_rslora=rslora, rank_pattern={"v_proj": 2}, svd_cache=False)
    model = get_lora_model(make_model("llama"), config)
    with torch.no_grad():  # "training"
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    inputs = make_inputs("llama")
    trained = logits(model, inputs)
    export_plain_lora(model, tmp_path / "plain")
    written = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["rank_pattern"] == {"v_proj": 4} and written["init_lora_weights"] is True
    assert written["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    reference_model = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "plain")
    torch.testing.assert_close(logits(reference_model, inputs), trained, atol=1e-5, rtol=0)

    # After save + reload (the initial factors travel with the adapter) the export still works.
    model.save_pretrained(tmp_path / "residual_adapter")
    save_residual_model(model, tmp_path / "residual_base")
    from transformers import AutoModelForCausalLM

    reloaded = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "residual_base"), tmp_path / "residual_adapter")
    torch.testing.assert_close(logits(reloaded, inputs), trained, atol=1e-5, rtol=0)
    export_plain_lora(reloaded, tmp_path / "plain_again")
    again = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "plain_again")
    torch.testing.assert_close(logits(again, inputs), trained, atol=1e-5, rtol=0)


def test_export_refuses_plain_lora_adapters(tmp_path):
    model = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(Exception, match="no initial factors"):
        export_plain_lora(model, tmp_path)


def test_cache_hit_miss_and_corruption(tmp_path, monkeypatch):
    import lorakit.core.svd as svd

    W = torch.randn(20, 30)
    calls = []
    real_gram = svd.SOLVERS["gram"]
    monkeypatch.setitem(svd.SOLVERS, "gram", lambda *a: calls.append(1) or real_gram(*a))
    first = decompose(W, 3, False, "gram", cache=tmp_path)
    second = decompose(W, 3, False, "gram", cache=tmp_path)
    assert len(calls) == 1 and torch.equal(first.U, second.U)  # hit
    decompose(W + 1e-3, 3, False, "gram", cache=tmp_path)
    decompose(W, 3, True, "gram", cache=tmp_path)
    assert len(calls) == 3  # other bytes or other side: misses
    for damage in (lambda b: b[:50], lambda b: b[:-8] + b"\x00" * 8):
        for path in tmp_path.iterdir():
            path.write_bytes(damage(path.read_bytes()))
        rebuilt = decompose(W, 3, False, "gram", cache=tmp_path)
        torch.testing.assert_close(rebuilt.S, first.S)
    assert len(calls) == 5  # each damaged entry was recomputed, never trusted


def test_non_float_weights_are_refused():
    model = make_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(TargetModuleError, match="float32, bfloat16 or float16"):
        get_lora_model(model, LoraConfig(target_modules=["layers.0.self_attn.q_proj"], init_lora_weights="milora"))


def test_export_command_works_from_files_alone(tmp_path):
    from lorakit.cli import main

    model = get_lora_model(make_model("gpt2"), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], init_lora_weights="milora", svd_cache=False))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    inputs = make_inputs("gpt2")
    trained = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "plain")]) == 0
    reference_model = peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "plain")
    torch.testing.assert_close(logits(reference_model, inputs), trained, atol=1e-5, rtol=0)


def test_svd_init_refuses_tied_embeddings_before_changing_anything():
    from lorakit import LoraConfigError

    model = make_model("gpt2")  # wte is tied to lm_head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoraConfigError, match=r"'transformer.wte' shares its weight with \['lm_head.weight'\]"):
        get_lora_model(model, LoraConfig(r=3, target_modules=["c_attn", "wte"], init_lora_weights="pissa", svd_cache=False))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(type(m).__name__.startswith("Lora") for m in model.modules())


@pytest.mark.parametrize("remove", ["unload", "delete_adapter"])
def test_removing_an_svd_adapter_restores_the_original_base(remove):
    inputs = make_inputs("llama")
    expected = logits(make_model("llama"), inputs)
    model = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", svd_cache=False))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    plain = model.unload() if remove == "unload" else (model.delete_adapter("default"), model.model)[1]
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=0)


def test_residual_model_from_the_command_line(tmp_path):
    from lorakit import base_models
    from lorakit.cli import main

    base_dir = write_tiny_model(tmp_path / "base")
    model = get_lora_model(base_models.load(base_dir)[0], LoraConfig(r=3, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa", svd_cache=False))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(5, 90, (2, 8))
    trained = logits(model, {"input_ids": ids})
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--residual-model", str(tmp_path / "residual"), "--model", str(base_dir)]) == 0
    rebuilt = LoraModel.from_pretrained(base_models.load(tmp_path / "residual")[0], tmp_path / "adapter")
    torch.testing.assert_close(logits(rebuilt, {"input_ids": ids}), trained, atol=1e-5, rtol=0)
