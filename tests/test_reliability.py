"""Fault injection, one test (or more) per class of defect: wrong results, half-changed models, half-written
folders, non-finite steps, resumes that mix runs, and user mistakes that must be one line and exit 2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_model
from offline_fixtures import tiny_trainer, write_tiny_model
from safetensors.torch import load_file
from test_errors import _assert_unchanged, _snapshot
from torch import nn

import lorakit.core.atomic
import lorakit.core.inits
from lorakit import (
    AdapterLoadError,
    AdapterNameError,
    LoraConfig,
    LoraConfigError,
    LoraModel,
    base_models,
    data,
    get_lora_model,
    lorahub,
)
from lorakit.cli import main
from lorakit.core import examples
from lorakit.core.errors import (
    DataError,
    MixedBatchError,
    ResumeError,
    TrainingDivergedError,
)
from lorakit.core.peft_format import read_adapter
from lorakit.core.plotting import pyplot, save_png
from lorakit.training.trainer import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny local HF model folder (with a tokenizer)."""
    return write_tiny_model(tmp_path_factory.mktemp("reliability") / "model")


# -- mixed batches honour modules_to_save ----------------------------------------------------------
def _two_heads(tmp_path: Path) -> LoraModel:
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_lora_model(make_model("llama"), config)
    model.add_adapter("b", config)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, wrapper in model.saved_modules():
            wrapper.copies["default"].weight.add_(torch.randn_like(wrapper.base_layer.weight))
            wrapper.copies["b"].weight.add_(3 * torch.randn_like(wrapper.base_layer.weight))
    return model


def test_mixed_batch_routes_modules_to_save_per_row(tmp_path):
    model = _two_heads(tmp_path)
    ids = torch.randint(1, 96, (4, 6), generator=torch.Generator().manual_seed(0))
    rows = ["default", "b", "__base__", "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows).logits
        for row, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-4, rtol=1e-5)
    # PEFT, the reference, routes the same way
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    reference.load_adapter(tmp_path / "b", "b")
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=rows).logits
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=1e-5)


def test_mixed_batch_gradients_reach_each_rows_own_head(tmp_path):
    model = _two_heads(tmp_path)
    model.set_adapter(["default", "b"])
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, adapter_names=["default", "b"], labels=ids).logits.sum().backward()
    head = dict(model.saved_modules())["lm_head"]
    mixed_grad = head.copies["b"].weight.grad.clone()
    head.copies["b"].weight.grad = None
    model.set_adapter("b")
    model(input_ids=ids[1:]).logits.sum().backward()
    torch.testing.assert_close(mixed_grad, head.copies["b"].weight.grad, atol=1e-5, rtol=1e-5)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x), x


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.pair = nn.Linear(4, 4), _Pair()

    def forward(self, x):
        return self.pair(self.proj(x))[0]


def test_mixed_batch_through_a_module_it_cannot_split_is_refused():
    model = get_lora_model(_TupleModel(), LoraConfig(r=2, target_modules=["proj"], modules_to_save=["pair"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["proj"], modules_to_save=["pair"]))
    with pytest.raises(MixedBatchError, match="one tensor row per input row"):
        model(torch.ones(2, 4), adapter_names=["default", "b"])
    assert model(torch.ones(2, 4)).shape == (2, 4)  # routing was switched off again


# -- a save is one complete folder -------------------------------------------------------------------
def test_plain_save_over_a_pissa_folder_leaves_no_stale_initial_factors(tmp_path):
    pissa = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa", svd_cache=False))
    pissa.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "initial_factors.safetensors").is_file()
    plain = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    plain.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = LoraModel.from_pretrained(make_model("llama"), tmp_path / "a").unload()
    original = make_model("llama")
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), original.state_dict().values()))


def test_save_never_replaces_a_folder_of_other_things(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.core.errors.AdapterSaveError, match="no adapter"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


_SAVER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_model
    from lorakit import LoraConfig, get_lora_model
    models = []
    for r in (2, 4):
        model = get_lora_model(make_model("llama"), LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        models.append(model)
    i = 0
    while True:
        model = models[i % 2]
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_A["default"].fill_(float(i))
        model.save_pretrained({folder!r})
        if i == 0:
            print("saving", flush=True)
        i += 1
""")


def test_sigkill_during_saves_leaves_exactly_one_complete_save(tmp_path):
    """A child saves two different adapters (r=2 and r=4, every value = the save's number) into one folder
    as fast as it can; SIGKILL at random moments. The folder must always hold one whole save."""
    folder = tmp_path / "adapter"
    script = _SAVER.format(tests=str(ROOT / "tests"), folder=str(folder))
    rng = random.Random(0)
    for trial in range(6):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(ROOT)})
        assert child.stdout.readline().strip() == b"saving"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        adapter = read_adapter(folder)
        values = torch.cat([t.flatten() for k, t in adapter.tensors.items() if "lora_A" in k]).unique()
        assert len(values) == 1, f"trial {trial}: tensors of several saves mixed: {values}"
        save_number = int(values.item())
        assert adapter.config.r == (2 if save_number % 2 == 0 else 4)
        assert all(t.shape[0] == adapter.config.r for k, t in adapter.tensors.items() if "lora_A" in k)
    model = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)  # temporaries of the killed children are swept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_swap_without_rename_exchange_recovers_after_a_kill_between_renames(tmp_path, monkeypatch):
    """Where the kernel cannot exchange two paths, the old folder is put aside first; a save killed between
    the two renames leaves it there, and the next read or write puts it back."""
    folder = tmp_path / "adapter"
    model = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    before = load_file(folder / "adapter_model.safetensors")
    aside = tmp_path / f".adapter.old-{2**22 + 12345}-dead"  # as a killed process (no such pid) leaves it
    os.replace(folder, aside)
    assert LoraModel.from_pretrained(make_model("llama"), folder)  # the read restores the complete old save
    assert not aside.exists()
    after = load_file(folder / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(lorakit.core.atomic, "_exchange", lambda first, second: False)
    model.save_pretrained(folder)  # the fallback path itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failed_swap_keeps_the_previous_save(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    model = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(first, second):
        raise OSError("I/O error")

    monkeypatch.setattr(lorakit.core.atomic, "_exchange", crash)
    with pytest.raises(OSError):
        get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["v_proj"])).save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# -- transactional mutation ------------------------------------------------------------------------
def test_svd_init_failing_part_way_restores_the_base_bit_exactly(monkeypatch):
    model = make_model("llama")
    snapshot = _snapshot(model)
    real, calls = lorakit.core.inits.INIT_STRATEGIES["milora"], []

    def failing(W, r, scale, **options):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("solver failed")
        return real(W, r, scale, svd_solver="exact", svd_cache=False)

    monkeypatch.setitem(lorakit.core.inits.INIT_STRATEGIES, "milora", failing)
    with pytest.raises(RuntimeError, match="solver failed"):
        get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="milora"))
    assert len(calls) == 4
    _assert_unchanged(model, snapshot)  # torch.equal: bit-exact, not "close"


def test_corrupt_initial_factors_change_nothing(tmp_path):
    pissa = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa", svd_cache=False))
    pissa.save_pretrained(tmp_path)
    (tmp_path / "initial_factors.safetensors").write_bytes(b"\x00" * 40)
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="initial_factors.safetensors.*Delete it"):
        LoraModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("name", ["v1.2", "", "keys", "forward", "training", "/tmp/elsewhere", "__base__", "a" * 65])
def test_bad_adapter_names_change_nothing(name):
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterNameError):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"]), adapter_name=name)
    _assert_unchanged(model, snapshot)
    wrapped = get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    snapshot = _snapshot(wrapped)
    with pytest.raises(AdapterNameError):
        wrapped.add_adapter(name, LoraConfig(target_modules=["v_proj"]))
    _assert_unchanged(wrapped, snapshot)


def test_temporaries_of_a_killed_save_are_removed(tmp_path):
    stale = tmp_path / f".adapter.tmp-{2**22 + 4321}-0000"  # no such process
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_empty_svd_cache_path_is_refused():
    with pytest.raises(LoraConfigError, match="svd_cache"):
        LoraConfig(target_modules=["q_proj"], svd_cache="")


# -- non-finite gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nan_gradient_with_finite_loss_is_never_applied_or_saved(tiny, tmp_path, max_grad_norm):
    trainer = tiny_trainer(tiny, tmp_path, max_grad_norm=max_grad_norm)
    trainer.train_step(), trainer.train_step()
    good = trainer.save_checkpoint()
    layer = next(trainer.module.lora_layers())[1]
    hook = layer.lora_A["default"].register_hook(lambda grad: grad * float("nan"))
    before = {k: v.detach().clone() for k, v in trainer.module.named_parameters() if v.requires_grad}
    with pytest.raises(TrainingDivergedError, match=r"gradient norm became nan at step 3.*not applied.*step-000002"):
        trainer.train_step()
    hook.remove()
    after = {k: v for k, v in trainer.module.named_parameters() if v.requires_grad}
    assert all(torch.equal(before[k], after[k]) for k in before)  # AdamW never stepped
    assert latest_checkpoint(tmp_path) == good
    saved = load_file(good / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


# -- resume --------------------------------------------------------------------------------------------
def test_resume_with_other_settings_or_data_is_refused_listing_them(tiny, tmp_path):
    trainer = tiny_trainer(tiny, tmp_path)
    trainer.train_step(), trainer.train_step()
    trainer.save_checkpoint()
    with pytest.raises(ResumeError, match=r"training.lr: 0.002 -> 0.001.*training.batch_size|training.batch_size.*training.lr"):
        tiny_trainer(tiny, tmp_path, resume=True, lr=1e-3, batch_size=8)
    with pytest.raises(ResumeError, match=r"adapter.r: 4 -> 8"):
        tiny_trainer(tiny, tmp_path, resume=True, lora=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    _, tokenizer = base_models.load(tiny)
    other = [examples.tokenize_example(tokenizer, f"{i} odd?", "no", 32) for i in range(40)]
    with pytest.raises(ResumeError, match=r"data:"):
        tiny_trainer(tiny, tmp_path, items=other, resume=True)
    assert tiny_trainer(tiny, tmp_path, resume=True, eval_every=3).step == 2  # bookkeeping may change


def test_resume_without_checkpoint_says_so_and_drops_unsaved_metrics(tiny, tmp_path, capsys):
    tmp_path.joinpath("metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    trainer = tiny_trainer(tiny, tmp_path, resume=True)
    assert trainer.step == 0 and "no checkpoint" in capsys.readouterr().err
    assert tmp_path.joinpath("metrics.jsonl").read_text() == ""
    trainer.train_step()
    trainer._log({"step": 1, "loss": 0.5})
    assert [json.loads(line)["step"] for line in tmp_path.joinpath("metrics.jsonl").read_text().splitlines()] == [1]


def test_garbage_trainer_state_is_a_resume_error(tiny, tmp_path):
    trainer = tiny_trainer(tiny, tmp_path)
    trainer.train_step()
    checkpoint = trainer.save_checkpoint()
    (checkpoint / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="could not be read.*delete"):
        tiny_trainer(tiny, tmp_path, resume=True)


# -- data ------------------------------------------------------------------------------------------------
def test_null_completion_names_row_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n')
    with pytest.raises(DataError, match=r"row 2: column 'completion' is null"):
        data.load_examples(path)


# -- LoraHub -------------------------------------------------------------------------------------------
def _hub_setup(tiny):
    model, tokenizer = base_models.load(tiny)
    modules = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        lora = get_lora_model(base_models.load(tiny)[0], LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        modules.append(lorahub.as_module((lora, "default")))
    return model, tokenizer, modules


@pytest.mark.parametrize("bad", [dict(lam=float("nan")), dict(lam=float("inf")), dict(budget=0), dict(bounds=(1.0, float("nan"))),
                                 dict(examples=[]), dict(start="middle"), dict(optimizer="NoSuchOpt", start="best-single"),
                                 dict(start="best-single", bounds=(-0.2, 0.3)), dict(bounds=(0.1, 0.5))])
def test_lorahub_refuses_bad_settings_before_touching_the_model(tiny, bad):
    model, tokenizer, modules = _hub_setup(tiny)
    snapshot = _snapshot(model)
    few = bad.pop("examples", [examples.Example("1 even?", "no")])
    with pytest.raises(LoraConfigError):
        lorahub.learn(model, modules, few, tokenizer, progress=False, **bad)
    _assert_unchanged(model, snapshot)


def test_lorahub_returns_the_model_as_it_was(tiny):
    model, tokenizer, modules = _hub_setup(tiny)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # mixed flags come back as they were
    snapshot = _snapshot(model)
    lorahub.learn(model, modules, [examples.Example("1 even?", "no"), examples.Example("2 even?", "yes")], tokenizer, budget=3, progress=False)
    _assert_unchanged(model, snapshot)
    with pytest.raises(LoraConfigError, match="finite"):
        lorahub.compose(modules, [float("nan"), 1.0])


def test_lorahub_refuses_a_pissa_module(tiny, tmp_path):
    model, tokenizer, modules = _hub_setup(tiny)
    pissa = get_lora_model(base_models.load(tiny)[0], LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa", svd_cache=False))
    pissa.save_pretrained(tmp_path / "pissa")
    with pytest.raises(LoraConfigError, match="PiSSA/MiLoRA adapter.*Export it first"):
        lorahub.load_modules([modules[0], tmp_path / "pissa"])


# -- the command line: one line, exit 2 --------------------------------------------------------------
def _cli_cases(root: Path, tiny: Path) -> dict[str, list[str]]:
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    (root / "truncated.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "comp')
    (root / "bad.yaml").write_text("training: [steps: 3\n")
    (root / "list.yaml").write_text("training:\n  - steps\n")
    (root / "a-file").write_text("x")
    (root / "list-config").mkdir()
    (root / "list-config" / "adapter_config.json").write_text("[1, 2]")
    data_file = root / "ok.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": f"{i} even?", "completion": "yes"}) + "\n" for i in range(30)))
    run = [f"model.name={tiny}", f"data.source={data_file}", "data.test_size=4", "data.validation_size=2"]
    return {
        "steps=abc": ["train", "training.steps=abc"],
        "lr=-1": ["train", "training.lr=-1"],
        "batch_size=0": ["train", "training.batch_size=0"],
        "steps=0": ["train", "training.steps=0"],
        "schedule": ["train", "training.schedule=warm"],
        "dtype": ["train", "model.dtype=float8"],
        "grad_accum": ["train", "training.grad_accum=3"],
        "test_size=0": ["train", "data.test_size=0"],
        "use_rslora text": ["train", "lora.use_rslora=maybe"],
        "empty data": ["train", *run, f"data.source={root / 'empty.jsonl'}", f"training.output_dir={root / 'o1'}"],
        "non-UTF-8 data": ["train", *run, f"data.source={root / 'latin1.jsonl'}", f"training.output_dir={root / 'o2'}"],
        "truncated data": ["train", *run, f"data.source={root / 'truncated.jsonl'}", f"training.output_dir={root / 'o3'}"],
        "YAML syntax": ["train", str(root / "bad.yaml")],
        "missing config": ["train", str(root / "nope.yaml")],
        "section list": ["train", str(root / "list.yaml")],
        "output_dir is a file": ["train", *run, f"training.output_dir={root / 'a-file'}"],
        "info on a JSON list": ["info", str(root / "list-config")],
        "hub budget 0": ["hub", "learn", "--modules", str(root), "--examples", str(data_file), "--out", str(root / "h"), "--budget", "0"],
        "hub n-examples 0": ["hub", "learn", "--modules", str(root), "--examples", str(data_file), "--out", str(root / "h"), "--n-examples", "0"],
        "eval test-size 0": ["eval", "--model", str(tiny), "--data", str(data_file), "--test-size", "0"],
    }


def _one_error_line(err: str) -> bool:
    """The error is the last line, alone (progress bars of loading may precede it), with no traceback."""
    lines = err.rstrip("\n").split("\n")
    return lines[-1].startswith("lorakit: error: ") and err.count("lorakit: error") == 1 and "Traceback" not in err


def test_every_user_mistake_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    for label, argv in _cli_cases(tmp_path, tiny).items():
        assert main(argv) == 2, label
        err = capsys.readouterr().err
        assert _one_error_line(err), (label, err)
    assert not (tmp_path / "h").exists()  # nothing written by the refused hub runs


def test_garbage_trainer_state_via_cli_is_one_line(tiny, tmp_path, capsys):
    data_file = tmp_path / "ok.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": f"{i} even?", "completion": "yes"}) + "\n" for i in range(30)))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"garbage")
    get_lora_model(base_models.load(tiny)[0], LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(checkpoint / "adapter")
    argv = ["train", f"model.name={tiny}", f"data.source={data_file}", "data.test_size=4", "data.validation_size=2",
            f"training.output_dir={tmp_path / 'run'}", "training.batch_size=4", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt could not be read" in err and _one_error_line(err)


def test_first_adapter_draws_the_same_init_as_any_later_one():
    """Checking a name probes the wrappers once; that must not move the global RNG, or the same seed would
    give another init in a fresh process than in a warm one (and results would not reproduce)."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {tests!r})
        from conftest import make_model
        from lorakit import LoraConfig, get_lora_model
        from lorakit.core.names import check_adapter_name
        if sys.argv[1] == "warm":
            check_adapter_name("x")
        model = make_model("llama")
        torch.manual_seed(0)
        lora = get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        print(float(next(lora.lora_layers())[1].lora_A["default"].sum()))
    """).format(tests=str(ROOT / "tests"))
    cold, warm = (subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True, check=True,
                                 env=os.environ | {"PYTHONPATH": str(ROOT)}).stdout for kind in ("cold", "warm"))
    assert cold == warm


def test_a_plot_that_fails_to_draw_leaves_the_previous_png_and_closes_its_figure(tmp_path, monkeypatch):
    plt = pyplot()
    path = tmp_path / "loss.png"
    figure, axis = plt.subplots()
    axis.plot([1, 2, 3])
    save_png(figure, path)
    previous = path.read_bytes()
    assert previous[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(figure.number)

    broken, _ = plt.subplots()
    monkeypatch.setattr(broken, "savefig", lambda target, **kwargs: (Path(target).write_bytes(b"half"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_png(broken, path)
    assert path.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    assert not plt.fignum_exists(broken.number)
