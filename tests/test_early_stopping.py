"""Early stopping: the run stops `patience` evaluations after its best validation loss, its adapter is the best
evaluation's (checked against the checkpoint saved at that step), a run killed and resumed stops at the same step
with the same adapter, and runs that cannot stop early are refused with a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from offline_fixtures import tiny_trainer
from safetensors.torch import load_file
from test_train import _config_file, _env

from lorakit import LoraConfigError
from lorakit.training.early_stopping import EarlyStopping, early_stopping_for
from lorakit.training.recipe import load_run_config
from lorakit.training.settings import TrainingConfig


@settings(max_examples=200, deadline=None)
@given(losses=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30), patience=st.integers(1, 5))
def test_it_stops_patience_evaluations_after_the_first_lowest_loss_and_keeps_that_evaluations_tensors(losses, patience):
    stopping, live = EarlyStopping(patience), {"w": torch.zeros(1)}
    seen = []
    for step, loss in enumerate(losses, start=1):
        live["w"].fill_(step)
        seen.append(loss)
        if stopping.update(step, loss, live):
            break
    first_lowest = seen.index(min(seen)) + 1
    assert stopping.best_step == first_lowest and stopping.best_loss == min(seen)
    assert stopping.stopped == (len(seen) - first_lowest >= patience)
    assert not stopping.stopped or len(seen) - first_lowest == patience  # and not one evaluation later
    stopping.restore(live)
    assert live["w"].item() == first_lowest


def test_min_delta_counts_small_gains_as_no_gain():
    stopping, live = EarlyStopping(patience=2, min_delta=0.1), {"w": torch.zeros(1)}
    assert [stopping.update(step, loss, live) for step, loss in [(1, 1.0), (2, 0.95), (3, 0.92)]] == [False, False, True]
    assert stopping.best_step == 1


def _scripted(losses: dict[int, float], holder: list):
    """A validation whose loss at each step is given (the model, data and training are real)."""
    return lambda: {"loss": losses[holder[0].step]}


LOSSES = {2: 0.9, 4: 0.5, 6: 0.7, 8: 0.8, 10: 0.2}  # best at step 4; patience 2 stops at step 8, before 10's 0.2


def test_the_trainer_stops_and_its_adapter_is_the_best_evaluations(workspace, tmp_path):
    holder = []
    trainer = tiny_trainer(workspace / "model", tmp_path / "run", evaluate=_scripted(LOSSES, holder), eval_every=2,
                           early_stopping_patience=2)
    holder.append(trainer)
    history = trainer.fit()
    assert trainer.step == 8 and history[-1]["early_stop"] and history[-1]["best_step"] == 4
    best = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors")
    final = trainer.module.training_state("default")
    assert best.keys() == final.keys()
    for key in best:
        torch.testing.assert_close(final[key], best[key], rtol=0, atol=0, msg=key)
    moved = load_file(tmp_path / "run" / "checkpoints" / "step-000008" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(moved[k], best[k]) for k in best)  # training did move on after the best step


def test_a_killed_early_stopping_run_resumes_to_the_same_stop_and_adapter(workspace, tmp_path):
    holder = []
    whole = tiny_trainer(workspace / "model", tmp_path / "whole", evaluate=_scripted(LOSSES, holder), eval_every=2,
                         early_stopping_patience=2)
    holder.append(whole)
    whole.fit()
    holder.clear()
    killed = tiny_trainer(workspace / "model", tmp_path / "killed", evaluate=_scripted(LOSSES, holder), eval_every=2,
                          early_stopping_patience=2)
    holder.append(killed)
    for _ in range(6):  # a kill after step 6: the checkpoint of step 6 holds the best (step 4) tensors and one bad evaluation
        killed.train_step()
        if killed.step % 2 == 0:
            killed.early_stopping.update(killed.step, LOSSES[killed.step], killed._trainable_live())
            killed.save_checkpoint()
    holder.clear()
    resumed = tiny_trainer(workspace / "model", tmp_path / "killed", evaluate=_scripted(LOSSES, holder), eval_every=2,
                           early_stopping_patience=2, resume=True)
    holder.append(resumed)
    assert resumed.step == 6 and resumed.early_stopping.best_step == 4 and resumed.early_stopping.evaluations_since_best == 1
    resumed.fit()
    assert resumed.step == whole.step == 8
    expected, got = whole.module.training_state("default"), resumed.module.training_state("default")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_early_stopping_needs_evaluations_and_a_validation_split(workspace, tmp_path):
    with pytest.raises(LoraConfigError, match="set eval_every > 0"):
        load_run_config(None, ["training.early_stopping_patience=3", "training.eval_every=0"])
    with pytest.raises(LoraConfigError, match="PLoRA unloads the adapter"):
        early_stopping_for(TrainingConfig(early_stopping_patience=2), has_validation=True, periodic_unloading=True)
    assert early_stopping_for(TrainingConfig(), has_validation=False, periodic_unloading=True) is None  # off: no checks
    with pytest.raises(LoraConfigError, match="give the run a validation split"):
        tiny_trainer(workspace / "model", tmp_path / "none", early_stopping_patience=3)
    config = _config_file(workspace, "novalidation", steps=2, early_stopping_patience=2)
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(config), "data.validation_size=0"],
                            env=_env(workspace), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "give the run a validation split" in result.stderr
    assert not (workspace / "novalidation").exists()  # refused before anything was written
