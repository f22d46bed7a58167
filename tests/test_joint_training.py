"""Training several LoRA adapters together (one forward, each row through its own adapter) gives each adapter
the update a separate `Trainer` run gives it, to float tolerance; per-row dropout in training; clear refusals."""

from __future__ import annotations

import pytest
import torch
from offline_fixtures import tiny_tokenizer, write_tiny_model

from lorakit import LoraConfig, LoraConfigError, base_models, get_lora_model
from lorakit.core.errors import DataError
from lorakit.core.examples import tokenize_example
from lorakit.training.joint import train_together
from lorakit.training.trainer import Trainer, TrainingConfig

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("joint") / "model")


def _tasks(tokenizer) -> dict[str, list[dict]]:
    parity = [tokenize_example(tokenizer, f"{i} even?", "yes" if i % 2 == 0 else "no", 32) for i in range(24)]
    doubling = [tokenize_example(tokenizer, f"twice {i} is", str(2 * i) + " ok", 32) for i in range(30)]  # other lengths
    copying = [tokenize_example(tokenizer, f"say {i}", f"{i} {i}", 32) for i in range(17)]
    return {"parity": parity, "doubling": doubling, "copying": copying}


def _model_with(model_dir, names, seed=0):
    torch.manual_seed(seed)
    model = get_lora_model(base_models.load(model_dir)[0], LORA, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LORA)
    return model


@pytest.mark.parametrize("grad_accum,max_grad_norm", [(1, 1.0), (2, 0.05)])  # 0.05: clipping acts, per adapter
def test_each_adapter_ends_as_it_would_trained_alone(model_dir, tmp_path, grad_accum, max_grad_norm):
    tokenizer = tiny_tokenizer()
    tasks = _tasks(tokenizer)
    config = TrainingConfig(output_dir=str(tmp_path / "unused"), steps=7, batch_size=4, grad_accum=grad_accum, lr=0.02,
                            warmup_steps=2, max_grad_norm=max_grad_norm, save_every=0, eval_every=0, seed=3)
    together = _model_with(model_dir, list(tasks))
    initial = {name: {k: v.detach().clone() for k, v in together.training_state(name).items()} for name in tasks}
    history = train_together(together, tasks, config, tokenizer.pad_token_id, progress=False)
    assert len(history) == 7 and set(history[0]["loss"]) == set(tasks)
    for name, items in tasks.items():
        alone = _model_with(model_dir, [name])
        with torch.no_grad():
            for key, value in alone.training_state(name).items():
                value.copy_(initial[name][key])
        trainer = Trainer(alone, items, TrainingConfig(**(vars(config) | {"output_dir": str(tmp_path / name)})), tokenizer.pad_token_id)
        losses = [m["loss"] for m in trainer.fit()]
        assert losses == pytest.approx([m["loss"][name] for m in history], rel=1e-5)
        expected, got = alone.training_state(name), together.training_state(name)
        assert any(not torch.equal(got[k], initial[name][k]) for k in got)  # it trained
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=2e-6, rtol=1e-5, msg=f"{name} {key}")


def test_mixed_rows_in_training_drop_out_with_their_own_adapters_rate(model_dir):
    model = _model_with(model_dir, ["kept", "dropped"])
    layer = next(layer for _, layer in model.lora_layers())
    layer.dropout["dropped"] = 0.9
    x = torch.randn(4, 5, layer.in_features)
    rows = ["kept", "dropped", "kept", "dropped"]
    model.eval()
    with torch.no_grad():
        calm = [layer.adapter_output(x[i : i + 1], name) for i, name in enumerate(rows)]
        model.train()
        from lorakit.core.routing import RowAdapters

        mixed = layer._mixed_rows_output(x, RowAdapters.for_rows(rows, ["kept", "dropped"], x.device))
    for i, name in enumerate(rows):
        same = torch.allclose(mixed[i], calm[i][0], atol=1e-6)
        assert same == (name == "kept"), (i, name)


def test_bad_joint_runs_are_refused(model_dir, tmp_path):
    tokenizer = tiny_tokenizer()
    tasks = _tasks(tokenizer)
    model = _model_with(model_dir, ["parity", "doubling"])
    config = TrainingConfig(output_dir=str(tmp_path), steps=2, batch_size=4)
    with pytest.raises(LoraConfigError, match="copying is not one"):
        train_together(model, tasks, config, tokenizer.pad_token_id)
    with pytest.raises(LoraConfigError, match="training.packing"):
        train_together(model, {"parity": tasks["parity"]}, TrainingConfig(output_dir=str(tmp_path), packing=True), 0)
    with pytest.raises(DataError, match="fewer than one batch"):
        train_together(model, {"parity": tasks["parity"][:3]}, config, tokenizer.pad_token_id)
    with pytest.raises(LoraConfigError, match="LoraModel"):
        train_together(base_models.load(model_dir)[0], {"parity": tasks["parity"]}, config, tokenizer.pad_token_id)
