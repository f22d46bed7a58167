"""Property-based robustness (hypothesis): generated configs, adapter names, adapter files and CLI overrides.

The property everywhere: the outcome is either OK (and then the result is right: a reload gives the same
logits) or a `LoraError`, and after a `LoraError` the model is bit-identical to what it was. No other
exception type, no half-wrapped model, no file written outside the folder asked for.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import make_model
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorakit import (
    IA3Config,
    LoraConfig,
    LoraError,
    LoraModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_lora_model,
    get_peft_model,
    load_peft_model,
)
from lorakit.training.recipe import RunConfig, load_run_config, valid_keys

CONFIG_EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_CONFIGS", 3000))
PIPELINE_EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_PIPELINE", 1000))
FILE_EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_FILES", 1000))
OVERRIDE_EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_OVERRIDES", 1500))

@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """SVD inits cache decompositions: keep them out of the user's cache, and run in a scratch folder, since a
    generated ``svd_cache`` may be any relative folder name (which the config rightly accepts)."""
    previous, cwd = os.environ.get("LORAKIT_CACHE"), os.getcwd()
    os.environ["LORAKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
    if previous is None:
        del os.environ["LORAKIT_CACHE"]
    else:
        os.environ["LORAKIT_CACHE"] = previous


# -- strategies ------------------------------------------------------------------------------------
NASTY_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1.0, 0.0])
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**7), st.floats(allow_nan=True, allow_infinity=True), NASTY_FLOATS,
    st.text(max_size=8), st.sampled_from(["false", "true", "no", "0.1", "1e-3", "inf", "nan", "", ".", "(", "/abs"]),
    st.lists(st.text(max_size=5), max_size=3), st.sets(st.text(max_size=4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 9), max_size=2), st.tuples(st.integers(0, 3)),
)
LAYER_NAMES = ["q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "embed_tokens", "layers.0.self_attn.q_proj", "nothing"]
VALID = {
    "r": st.integers(1, 8),
    "lora_alpha": st.one_of(st.integers(1, 64), st.floats(0.01, 64)),
    "target_modules": st.one_of(
        st.lists(st.sampled_from(LAYER_NAMES), min_size=1, max_size=3, unique=True),
        st.sampled_from(["all-linear", r".*\.(q|v)_proj", r".*mlp.*", "q_proj(", "[", r"(?P<idx>x)"]),
    ),
    "exclude_modules": st.one_of(st.none(), st.just(["v_proj"]), st.just(r".*layers\.0.*")),
    "layers_to_transform": st.one_of(st.none(), st.just([0]), st.just(1), st.just([7])),
    "layers_pattern": st.one_of(st.none(), st.just("layers"), st.just("(")),
    "lora_dropout": st.floats(0.0, 0.99),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "use_rslora": st.booleans(),
    "modules_to_save": st.one_of(st.none(), st.just(["lm_head"]), st.just(["norm"]), st.just(["missing"])),
    "fan_in_fan_out": st.just(False),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj", r"layers\.0\..*"]), st.integers(1, 6), max_size=2),
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj"]), st.floats(0.5, 32), max_size=2),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "kaiming", "pissa", "milora", "pissa_niter_2", "olora"]),
    "merge_weights": st.booleans(),
    "svd_solver": st.sampled_from(["auto", "exact", "gram", "randomized", "fast"]),
    "svd_cache": st.booleans(),
}


@st.composite
def config_kwargs(draw, wild: float):
    """LoraConfig keyword arguments: each field valid or, with probability `wild`, anything at all."""
    kwargs = {}
    wild_draw = st.sampled_from([False] * round(100 * (1 - wild)) + [True] * round(100 * wild))  # uniform, unlike floats
    for name, valid in VALID.items():
        if draw(st.booleans()) and name != "target_modules":
            continue  # leave at the default
        kwargs[name] = draw(anything) if draw(wild_draw) else draw(valid)
    kwargs.setdefault("target_modules", draw(VALID["target_modules"]))
    return kwargs


def _snapshot(model: torch.nn.Module):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def _is_unchanged(model: torch.nn.Module, snapshot) -> bool:
    modules, params = snapshot
    now = dict(model.named_parameters())
    return (
        [(n, type(m)) for n, m in model.named_modules()] == modules
        and set(now) == set(params)
        and all(torch.equal(now[n], value) and now[n].requires_grad == flag for n, (value, flag) in params.items())
    )

def _built_or_refused(model: torch.nn.Module, build, label: str):
    """`build()`'s result, or None after a LoraError that left `model` exactly as it was (events name the outcome)."""
    snapshot = _snapshot(model)
    try:
        built = build()
    except LoraError as err:
        event(f"{label}: refused ({type(err).__name__})")
        assert _is_unchanged(model, snapshot)
        return None
    event(f"{label}: accepted")
    return built



# -- configs ---------------------------------------------------------------------------------------
@settings(max_examples=CONFIG_EXAMPLES)
@given(config_kwargs(wild=0.25))
def test_any_config_is_valid_or_a_config_error(kwargs):
    try:
        config = LoraConfig(**kwargs)
    except LoraError as err:
        event(f"refused: {type(err).__name__}")
        return
    event("accepted")
    assert isinstance(config.r, int) and not isinstance(config.r, bool) and config.r >= 1
    assert math.isfinite(config.lora_alpha) and config.lora_alpha > 0
    assert all(isinstance(getattr(config, f), bool) for f in ("use_rslora", "merge_weights", "fan_in_fan_out"))
    assert isinstance(config.lora_dropout, (int, float)) and 0 <= config.lora_dropout < 1
    assert math.isfinite(config.scale_for(config.r, config.lora_alpha))
    assert LoraConfig.from_peft_dict(json.loads(json.dumps(config.to_peft_dict()))) == config  # round trip through JSON


@settings(max_examples=PIPELINE_EXAMPLES)
@given(config_kwargs(wild=0.02), st.integers(0, 2**16))
def test_config_wrap_train_save_reload(kwargs, seed):
    """config -> wrap -> forward -> backward -> save -> reload: equal logits, or a LoraError and no change."""
    model = make_model("llama")
    lora_model = _built_or_refused(model, lambda: get_lora_model(model, LoraConfig(**kwargs)), "wrap")
    if lora_model is None:
        return
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(seed))
    lora_model.train()
    loss = lora_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in lora_model.parameters() if p.grad is not None)
    lora_model.eval()
    with tempfile.TemporaryDirectory() as folder:
        lora_model.save_pretrained(folder)
        assert sorted(os.listdir(folder)) in (
            ["adapter_config.json", "adapter_model.safetensors"],
            ["adapter_config.json", "adapter_model.safetensors", "initial_factors.safetensors"],
        )
        reloaded = LoraModel.from_pretrained(make_model("llama"), folder)
    for _, layer in reloaded.lora_layers():  # a PiSSA/MiLoRA adapter applies to its residual base
        for name in list(layer.initial_factors):
            layer.residualise(name)
    with torch.no_grad():
        expected, got = lora_model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- adapter names ---------------------------------------------------------------------------------
NAME_TEXT = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "_-./\\ :~", max_size=70),
    st.sampled_from(["", ".", "..", "a.b", "/tmp/evil", "../up", "training", "forward", "keys", "model", "__base__",
                     "default", "lora_A", "x" * 64, "x" * 65, "ünï", "a b"]),
    st.integers(), st.none(),
)


@settings(max_examples=int(os.environ.get("LORAKIT_FUZZ_NAMES", 1000)))
@given(NAME_TEXT)
def test_any_adapter_name_is_used_safely_or_refused(name):
    model = make_model("llama")
    snapshot = _snapshot(model)
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    try:
        lora_model = get_lora_model(model, config, adapter_name=name)
    except LoraError as err:
        event(f"refused: {type(err).__name__}")
        assert _is_unchanged(model, snapshot)
        return
    event("accepted")
    with tempfile.TemporaryDirectory() as root:
        outside_before = set(os.listdir(os.path.dirname(root)))
        lora_model.save_pretrained(os.path.join(root, "save"))
        assert set(os.listdir(os.path.dirname(root))) == outside_before  # nothing written beside or above
        lora_model.eval()  # names must not shadow module attributes
        assert lora_model(input_ids=torch.ones(1, 3, dtype=torch.long)).logits.shape == (1, 3, 96)


# -- adapter files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "adapter"
    model = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=8,
)

damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 3000)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=6)),
    st.tuples(st.just("config_json"), json_values),
    st.tuples(st.just("config_field"), st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "use_dora",
                                                        "modules_to_save", "rank_pattern", "bias", "init_lora_weights"]), anything),
    st.tuples(st.just("config_text"), st.binary(max_size=40)),
    st.tuples(st.just("drop_key"), st.integers(0, 7)),
    st.tuples(st.just("reshape"), st.integers(0, 7), st.integers(1, 9)),
    st.tuples(st.just("dtype"), st.integers(0, 7), st.sampled_from([torch.int64, torch.float16, torch.bfloat16, torch.int8])),
    st.tuples(st.just("nonfinite"), st.integers(0, 7), NASTY_FLOATS),
    st.tuples(st.just("pickle"), st.booleans()),
    st.tuples(st.just("initial"), st.integers(0, 7), st.booleans()),
)


def _damage(folder: Path, how: tuple) -> None:
    weights, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    kind = how[0]
    if kind == "truncate":
        weights.write_bytes(weights.read_bytes()[: how[1]])
    elif kind == "flip":
        data = bytearray(weights.read_bytes())
        for position, value in how[1]:
            data[position % len(data)] = value
        weights.write_bytes(bytes(data))
    elif kind == "config_json":
        config_path.write_text(json.dumps(how[1]))
    elif kind == "config_field":
        config = json.loads(config_path.read_text())
        config[how[1]] = list(how[2]) if isinstance(how[2], (set, tuple)) else how[2]
        config_path.write_text(json.dumps(config))
    elif kind == "config_text":
        config_path.write_bytes(how[1])
    elif kind == "pickle":
        torch.save(load_file(weights), folder / "adapter_model.bin")
        if how[1]:
            weights.unlink()
    else:
        tensors = load_file(weights)
        key = sorted(tensors)[how[1] % len(tensors)]
        if kind == "drop_key":
            del tensors[key]
        elif kind == "reshape":
            tensors[key] = torch.zeros(how[2], tensors[key].shape[1])
        elif kind == "dtype":
            tensors[key] = tensors[key].to(how[2])
        elif kind == "nonfinite":
            tensors[key][0, 0] = torch.tensor(how[2], dtype=torch.float64).to(tensors[key].dtype)
        elif kind == "initial":
            initial = {key: tensors[key].clone()} if how[2] else {k: v.clone() for k, v in tensors.items()}
            save_file(initial, folder / "initial_factors.safetensors")
        save_file(tensors, weights)


@settings(max_examples=FILE_EXAMPLES)
@given(damage)
def test_any_damaged_adapter_loads_correctly_or_is_refused(saved_adapter, how):
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "adapter"
        shutil.copytree(saved_adapter, folder)
        _damage(folder, how)
        model = make_model("llama")
        snapshot = _snapshot(model)
        try:
            loaded = LoraModel.from_pretrained(model, folder)
        except LoraError as err:
            event(f"{how[0]}: refused ({type(err).__name__})")
            assert _is_unchanged(model, snapshot)
            return
        event(f"{how[0]}: loaded")
        with torch.no_grad():
            assert torch.isfinite(loaded(input_ids=torch.ones(1, 4, dtype=torch.long)).logits).all()
        # a second model gets an adapter added to an existing wrapper: also all-or-nothing
        other = get_lora_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
        snapshot = _snapshot(other)
        try:
            other.load_adapter(folder, "second")
        except LoraError:
            assert _is_unchanged(other, snapshot) and list(other.peft_config) == ["default"]


# -- CLI overrides ---------------------------------------------------------------------------------
override_text = st.one_of(
    st.text(max_size=12), st.sampled_from(["1e-3", "2e-4", "-1", "0", "abc", "[1, 2]", "{a: 1}", "null", "true", "nan",
                                           "inf", "1e38", "1.5", "'x'", "[", ": :", "- a", "cosine", "float32", "bfloat16"]),
    st.integers(-5, 10**6).map(str), st.floats(allow_nan=True).map(repr),
)


@settings(max_examples=OVERRIDE_EXAMPLES)
@given(st.lists(st.tuples(st.sampled_from(valid_keys() + ["training.setps", "lora", "x.y"]), override_text), min_size=1, max_size=3))
def test_any_override_parses_or_is_a_config_error(assignments):
    try:
        config = load_run_config(None, [f"{key}={value}" for key, value in assignments])
    except LoraError as err:
        event(f"refused: {type(err).__name__}")
        return
    event("accepted")
    assert isinstance(config, RunConfig)
    assert 0 < config.training.lr <= torch.finfo(torch.float32).max / 10 and config.training.steps >= 1 and config.training.batch_size % config.training.grad_accum == 0


def test_rates_written_as_yaml_text_are_numbers():
    """YAML 1.1 reads 1e-3 as a string; the recipe converts it to the field's type."""
    config = load_run_config(None, ["training.lr=1e-3", "lora.use_rslora=false", "data.test_size=0.2"])
    assert config.training.lr == 0.001 and config.lora.use_rslora is False and config.data.test_size == 0.2



@settings(max_examples=int(os.environ.get("LORAKIT_FUZZ_CLI", 300)))
@given(st.lists(st.tuples(st.sampled_from([k for k in valid_keys() if k not in ("training.output_dir", "training.resume")]),
                          override_text), max_size=3))
def test_any_train_command_line_is_one_line_and_exit_2_when_refused(assignments):
    """`lorakit train` with any overrides and an output_dir that is a file: every outcome is exit 2 with one
    line (the refused override, or the output folder), never a traceback."""
    import contextlib
    import io

    from lorakit.cli import main

    with tempfile.NamedTemporaryFile() as blocker:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["train", *(f"{key}={value}" for key, value in assignments), f"training.output_dir={blocker.name}"])
    assert code == 2
    text = err.getvalue()
    assert text.startswith("lorakit: error: ") and text.count("\n") == 1, text
    event("refused: output_dir is a file" if "is a file" in text else "refused: an override")


# -- the other PEFT methods ------------------------------------------------------------------------
METHOD_FIELDS = {
    IA3Config: {"target_modules": st.one_of(st.none(), st.just(["k_proj", "v_proj", "down_proj"]), st.just("k_proj"), anything),
                "feedforward_modules": st.one_of(st.none(), st.just(["down_proj"]), st.just([]), anything),
                "init_ia3_weights": st.one_of(st.booleans(), anything)},
    PromptTuningConfig: {"num_virtual_tokens": st.one_of(st.integers(-3, 50), anything), "token_dim": st.one_of(st.none(), st.integers(-1, 64), anything),
                         "prompt_tuning_init": st.one_of(st.sampled_from(["RANDOM", "SAMPLE_VOCAB", "TEXT"]), anything),
                         "prompt_tuning_init_text": st.one_of(st.none(), st.text(max_size=8))},
    PromptEncoderConfig: {"num_virtual_tokens": st.one_of(st.integers(-3, 50), anything), "encoder_hidden_size": st.one_of(st.none(), st.integers(-1, 64)),
                          "encoder_reparameterization_type": st.one_of(st.sampled_from(["MLP", "LSTM"]), anything),
                          "encoder_dropout": st.one_of(st.floats(-1, 2), NASTY_FLOATS), "num_layers": st.one_of(st.none(), st.integers(0, 4))},
    PrefixTuningConfig: {"num_virtual_tokens": st.one_of(st.integers(-3, 50), anything), "prefix_projection": st.one_of(st.booleans(), anything),
                         "encoder_hidden_size": st.one_of(st.none(), st.integers(-1, 64)), "num_layers": st.one_of(st.none(), st.integers(0, 4)),
                         "num_attention_heads": st.one_of(st.none(), st.integers(0, 4)), "init_weights": st.one_of(st.none(), st.just("zero"), anything)},
}


@st.composite
def method_configs(draw):
    config_class = draw(st.sampled_from(list(METHOD_FIELDS)))
    fields = METHOD_FIELDS[config_class]
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
    return config_class, {name: draw(fields[name]) for name in chosen}


@settings(max_examples=PIPELINE_EXAMPLES // 4)
@given(method_configs())
def test_any_method_config_wraps_saves_and_reloads_or_is_refused(drawn):
    """config -> wrap -> forward -> save -> reload (lorakit and PEFT read the same numbers), or a LoraError and no change."""
    config_class, kwargs = drawn
    model = make_model("llama")
    adapted = _built_or_refused(model, lambda: get_peft_model(model, config_class(**kwargs)), config_class.__name__)
    if adapted is None:
        return
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    with torch.no_grad():
        expected = adapted(**inputs).logits
    assert expected.shape == (2, 3, 96) and torch.isfinite(expected).all()
    with tempfile.TemporaryDirectory() as root:
        adapted.save_pretrained(root)
        again = load_peft_model(make_model("llama"), root)
        with torch.no_grad():
            torch.testing.assert_close(again(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def saved_method_adapters(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for config in (IA3Config(init_ia3_weights=False), PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=2)):
        folders[config.peft_type] = tmp_path_factory.mktemp("fuzz-methods") / config.peft_type
        get_peft_model(make_model("llama"), config).save_pretrained(folders[config.peft_type])
    return folders


@settings(max_examples=FILE_EXAMPLES // 4)
@given(st.sampled_from(["IA3", "PROMPT_TUNING", "PREFIX_TUNING"]), damage)
def test_any_damaged_method_adapter_loads_correctly_or_is_refused(saved_method_adapters, peft_type, how):
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "adapter"
        shutil.copytree(saved_method_adapters[peft_type], folder)
        _damage(folder, how)
        model = make_model("llama")
        loaded = _built_or_refused(model, lambda: load_peft_model(model, folder), f"{peft_type} {how[0]}")
        if loaded is None:
            return
        with torch.no_grad():
            assert torch.isfinite(loaded(input_ids=torch.ones(1, 4, dtype=torch.long)).logits).all()


@settings(max_examples=CONFIG_EXAMPLES // 10)
@given(st.fixed_dictionaries({}, optional={
    "reduction_factor": st.one_of(st.integers(-2, 9), anything), "side_layers": st.one_of(st.none(), st.lists(st.integers(-1, 3), max_size=4), anything),
    "gate_temperature": st.one_of(st.floats(-1, 1), NASTY_FLOATS), "init": st.one_of(st.sampled_from(["magnitude", "random", "fisher"]), anything),
}))
def test_any_lst_config_builds_a_side_network_or_is_refused(kwargs):
    from lorakit.methods.lst.config import LSTConfig
    from lorakit.methods.lst.model import LSTModel

    model = make_model("llama")
    lst = _built_or_refused(model, lambda: LSTModel(model, LSTConfig(**kwargs)), "LST")
    if lst is None:
        return
    with torch.no_grad():
        torch.testing.assert_close(lst(input_ids=torch.ones(1, 3, dtype=torch.long)).logits,
                                   model(input_ids=torch.ones(1, 3, dtype=torch.long)).logits, atol=0, rtol=0)
