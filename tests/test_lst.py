"""Ladder side-tuning: the backbone is reproduced exactly at init, gradients reach only the side network, the
backbone keeps no autograd graph, and pruning copies the chosen weights exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_inputs, make_model

from lorakit.core.errors import LoraConfigError, UnsupportedModelError
from lorakit.methods.lst.config import LSTConfig
from lorakit.methods.lst.model import LSTModel
from lorakit.methods.lst.pruning import kept_indices, magnitude

FAMILIES = ["llama", "gpt2"]  # causal LMs
ALL_FAMILIES = [*FAMILIES, "bert"]  # and a sequence classifier


def perturb(model: LSTModel, scale: float = 0.1) -> None:
    """Move every side parameter off its init (the up-projection off zero), so the side network matters."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(scale * torch.randn_like(p))


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_up_projection_or_closed_gates_reproduce_the_backbone(family):
    base = make_model(family)
    inputs = make_inputs(family)
    model = LSTModel(copy.deepcopy(base), LSTConfig(reduction_factor=2))
    with torch.no_grad():
        expected = base(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)  # up-projection starts at zero
        torch.nn.init.normal_(model.side.up.weight, std=0.5)
        assert not torch.allclose(model(**inputs).logits, expected, atol=1e-3)
        model.side.up.weight.zero_()
        model.side.gates.fill_(-1e4)  # μ = 0: the side stream ignores every ladder
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)


def _assert_side_stream_is_the_backbone(base, body) -> None:
    model = LSTModel(copy.deepcopy(base), LSTConfig(reduction_factor=1))
    with torch.no_grad():
        model.side.gates.fill_(-1e4)
        ids, mask = left_padded([[5, 6, 7, 8, 9], [11, 12]])
        captured = model._run_backbone(input_ids=ids, attention_mask=mask)
        stream = model.side.stream(captured["embeddings"], captured["states"], captured["kwargs"])
        expected = body(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(stream[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_at_full_width_with_closed_gates_the_side_stream_is_the_backbone(family):
    """r = 1 keeps every dimension in order, so with μ = 0 the side blocks recompute the backbone from its embeddings:
    the side stream must equal the backbone's own last (normed) hidden state, padding mask included."""
    base = make_model(family)
    _assert_side_stream_is_the_backbone(base, base.base_model if family == "bert" else base.model if family == "llama" else base.transformer)


@pytest.mark.parametrize("kind", ["roberta", "electra"])
def test_encoders_with_berts_layer_names_work_too(kind):
    from transformers import ElectraConfig, ElectraForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    sizes = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
             "max_position_embeddings": 64, "num_labels": 3}
    torch.manual_seed(0)
    if kind == "roberta":
        base = RobertaForSequenceClassification(RobertaConfig(**sizes, pad_token_id=1)).eval()
    else:
        base = ElectraForSequenceClassification(ElectraConfig(**sizes, embedding_size=32)).eval()
    _assert_side_stream_is_the_backbone(base, base.base_model)


def test_a_classifier_gets_class_logits_from_the_side_head_and_learns():
    base = make_model("bert")
    model = LSTModel(copy.deepcopy(base), LSTConfig(reduction_factor=2))
    ids, mask = left_padded([[5, 6, 7, 8, 9], [11, 12], [13, 14, 15], [20, 21, 22, 23]])
    labels = torch.tensor([0, 1, 2, 1])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (4, 3)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, q) for p, q in zip(model.model.parameters(), base.parameters()))  # the backbone never moved
    assert not hasattr(model.side, "up") and "side.head.3.weight" in model.training_state()


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_left_padded_batch_equals_rows_and_greedy_forward(family):
    model = LSTModel(make_model(family), LSTConfig(reduction_factor=2)).eval()
    perturb(model)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for i, row in enumerate(rows):
            alone = model.generate(input_ids=torch.tensor([row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
            greedy = torch.tensor([row])
            for _ in range(5):  # generate (with the side network's cache) must agree with the full forward pass
                greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1:].argmax(-1)], dim=1)
            assert torch.equal(alone, greedy)
            assert torch.equal(together[i, ids.shape[1]:], alone[0, len(row):])
        backbone_alone = model.model.generate(input_ids=torch.tensor([rows[0]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(backbone_alone, model.generate(input_ids=torch.tensor([rows[0]]), max_new_tokens=5, do_sample=False,
                                                          pad_token_id=0))  # the side network changed the text
    with pytest.raises(UnsupportedModelError, match="beam search"):
        model.generate(input_ids=torch.tensor([rows[0]]), max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_gradients_reach_only_the_side_network_and_the_backbone_keeps_no_graph(family):
    model = LSTModel(make_model(family), LSTConfig(reduction_factor=2, side_layers=[1]))
    perturb(model)
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for block in model.arch.blocks]
    ids = make_inputs(family)["input_ids"]
    labels = torch.tensor([0, 1, 2]) if family == "bert" else ids
    model(input_ids=ids, labels=labels).loss.backward()
    for hook in hooks:
        hook.remove()
    assert outputs and all(out.grad_fn is None and not out.requires_grad for out in outputs)  # nothing to backpropagate through
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained and all(name.startswith("side.") for name in trained)
    assert all(not p.requires_grad for p in model.model.parameters())
    assert {"side.gates", "side.head.3.weight" if family == "bert" else "side.up.weight", "side.ladders.0.weight"} <= trained


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_pruning_keeps_the_chosen_dimensions_exactly(family):
    base = make_model(family)
    model = LSTModel(copy.deepcopy(base), LSTConfig(reduction_factor=2))
    arch = model.arch
    for k, index in enumerate(model.side.layers):
        kept = kept_indices(arch.blocks[index], arch, 2, magnitude)
        side = dict(model.side.blocks[k].named_parameters())
        for name, (in_role, out_role) in arch.roles.items():
            full = dict(arch.blocks[index].named_parameters())[name]
            if full.dim() == 1:
                expected = full[kept[out_role]]
            elif arch.stored_in_out:
                expected = full[kept[in_role]][:, kept[out_role]]
            else:
                expected = full[kept[out_role]][:, kept[in_role]]
            assert torch.equal(side[name], expected), name
        ladder = model.side.ladders[k].weight  # starts as the selection of the kept residual dimensions
        assert torch.equal(ladder.argmax(1), kept["hidden"]) and ladder.sum() == kept["hidden"].numel()
    if arch.rotary is not None:  # whole rotary pairs
        dims = kept["head_dim"]
        half = arch.dims["head_dim"] // 2
        assert torch.equal(dims[len(dims) // 2:], dims[: len(dims) // 2] + half)


def test_fisher_init_ranks_by_gradients_and_training_lowers_the_loss():
    base = make_model("llama")
    ids = make_inputs("llama", batch=4)["input_ids"]
    batches = [{"input_ids": ids, "labels": ids}]
    model = LSTModel(copy.deepcopy(base), LSTConfig(reduction_factor=2, init="fisher"), fisher_batches=batches)
    assert all(not p.requires_grad for p in model.model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_settings_are_refused():
    with pytest.raises(LoraConfigError, match="reduction_factor"):
        LSTConfig(reduction_factor=0)
    with pytest.raises(LoraConfigError, match="does not divide"):
        LSTModel(make_model("llama"), LSTConfig(reduction_factor=3))
    with pytest.raises(LoraConfigError, match="side_layers"):
        LSTModel(make_model("llama"), LSTConfig(reduction_factor=2, side_layers=[5]))
    with pytest.raises(LoraConfigError, match="fisher_batches"):
        LSTModel(make_model("llama"), LSTConfig(reduction_factor=2, init="fisher"))
    with pytest.raises(UnsupportedModelError, match="Llama-family and GPT-2 causal LMs and BERT-style"):
        LSTModel(make_model("t5"), LSTConfig(reduction_factor=2))
    with pytest.raises(UnsupportedModelError, match="does not generate"):
        LSTModel(make_model("bert"), LSTConfig(reduction_factor=2)).generate(input_ids=torch.tensor([[1, 2]]))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_save_reload_gives_the_same_logits_and_peft_refuses_the_folder(family, tmp_path):
    import peft
    from safetensors.torch import load_file, save_file

    from lorakit.core.errors import AdapterLoadError

    base = make_model(family)
    model = LSTModel(copy.deepcopy(base), LSTConfig(reduction_factor=2, side_layers=[0, 1]))
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "lst")
    again = LSTModel.from_pretrained(copy.deepcopy(base), tmp_path / "lst")
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert again.config == model.config and not any(p.requires_grad for p in again.parameters())
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lst")
    tensors = load_file(tmp_path / "lst" / "lst_model.safetensors")
    damaged = "side.head.3.weight" if family == "bert" else "side.up.weight"
    tensors[damaged] = tensors[damaged][:, :-1].contiguous()
    save_file(tensors, tmp_path / "lst" / "lst_model.safetensors")
    fresh = copy.deepcopy(base)
    flags = [p.requires_grad for p in fresh.parameters()]
    with pytest.raises(AdapterLoadError, match=f"shape mismatch.*{damaged}"):
        LSTModel.from_pretrained(fresh, tmp_path / "lst")
    assert [p.requires_grad for p in fresh.parameters()] == flags


def test_the_one_entry_point_builds_and_loads_lst(tmp_path):
    from lorakit import get_peft_model, load_peft_model

    base = make_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), LSTConfig(reduction_factor=2))
    assert isinstance(model, LSTModel)
    perturb(model)
    model.save_pretrained(tmp_path / "side")
    again = load_peft_model(copy.deepcopy(base), tmp_path / "side")
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        assert isinstance(again, LSTModel) and torch.equal(again(**inputs).logits, model(**inputs).logits)
