"""The sweep's search space: Optuna distributions from YAML entries, every value a trial can draw loads as a
recipe setting, and bad spaces are refused (with the fix) before anything trains."""

from __future__ import annotations

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.training.recipe import load_run_config
from lorakit.training.search_space import SearchSpace, SearchSpaceError

optuna.logging.set_verbosity(optuna.logging.WARNING)

TARGETS = [["q_proj", "v_proj"], "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]]


def _loaded(space: SearchSpace, params: dict):
    config = load_run_config(None, space.overrides(params))
    return {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in params}


@settings(max_examples=30, deadline=None)
@given(ranks=st.lists(st.integers(1, 256), min_size=1, max_size=5, unique=True),
       lr=st.tuples(st.floats(1e-6, 1e-1), st.floats(1e-6, 1e-1)).map(sorted),
       dropout=st.tuples(st.floats(0.0, 0.9), st.floats(0.0, 0.9)).map(sorted), seed=st.integers(0, 1000))
def test_every_drawn_trial_loads_as_the_value_it_drew(ranks, lr, dropout, seed):
    space = SearchSpace({"lora.r": {"choices": ranks}, "training.lr": {"low": lr[0], "high": lr[1], "log": True},
                         "lora.lora_dropout": {"low": dropout[0], "high": dropout[1]}, "lora.target_modules": {"choices": TARGETS}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(3):
        params = space.suggest(study.ask())
        loaded = _loaded(space, params)
        assert loaded["lora.r"] in ranks and lr[0] <= loaded["training.lr"] <= lr[1]
        assert dropout[0] <= loaded["lora.lora_dropout"] <= dropout[1]
        assert loaded["lora.target_modules"] in TARGETS  # a list choice comes back as the list


@settings(max_examples=30, deadline=None)
@given(low=st.floats(0, 10), high=st.floats(0, 10))
def test_a_range_is_accepted_exactly_when_low_is_at_most_high(low, high):
    if low <= high:
        distribution = SearchSpace({"training.weight_decay": {"low": low, "high": high}}, None).distributions["training.weight_decay"]
        assert (distribution.low, distribution.high) == (low, high)
    else:
        with pytest.raises(SearchSpaceError, match="low=.* > high=.*swap them"):
            SearchSpace({"training.weight_decay": {"low": low, "high": high}})


def test_integer_ranges_stay_integers_with_their_step():
    distribution = SearchSpace({"lora.r": {"low": 4, "high": 32, "step": 4}}).distributions["lora.r"]
    assert isinstance(distribution, optuna.distributions.IntDistribution) and (distribution.low, distribution.high, distribution.step) == (4, 32, 4)


@pytest.mark.parametrize("space,message", [
    ({}, "the search space is empty"),
    ({"lora.rank": {"choices": [4]}}, "unknown config key 'lora.rank'. Did you mean 'lora.r'"),
    ({"trainig.lr": {"low": 1e-4, "high": 1e-3}}, "Did you mean 'training.lr'"),
    ({"lora.r": {"choices": []}}, "lora.r.choices must be a non-empty list"),
    ({"lora.r": {"choices": [4, 4]}}, "lists a value twice"),
    ({"lora.r": 8}, r"must be \{choices: \[...\]\} or \{low: ..., high: ...\}"),
    ({"training.lr": {"low": 1e-3}}, "optional log or step"),
    ({"training.lr": {"low": 0.0, "high": 1e-3, "log": True}}, "log: true needs low > 0"),
    ({"training.lr": {"low": 1e-4, "high": 1e-3, "step": -1}}, "step must be a positive number"),
    ({"training.lr": {"low": "a", "high": 1e-3}}, "must be numbers"),
    ({"lora.r": {"choices": [4, "big"]}}, r"lora.r='big' is not a valid setting"),
    ({"lora.lora_dropout": {"low": 0.0, "high": 1.5}}, r"lora.lora_dropout=1.5 is not a valid setting"),
])
def test_bad_spaces_are_refused_with_the_fix(space, message):
    with pytest.raises(SearchSpaceError, match=message):
        SearchSpace(space)
