"""The search space of a hyper-parameter sweep: recipe keys mapped to Optuna distributions, every bound and
choice checked against the recipe before anything trains.

A space is written as YAML, one entry per recipe key::

    lora.r: {choices: [4, 8, 16, 32]}
    training.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    lora.lora_dropout: {low: 0.0, high: 0.2, step: 0.05}
    lora.target_modules: {choices: [[q_proj, v_proj], all-linear]}

``choices`` become a categorical distribution (values Optuna cannot store, such as lists, are kept as their
YAML text and read back), ``low``/``high`` an integer distribution when both are integers and a float one
otherwise, with optional ``log`` or ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import LoraConfigError

__all__ = ["SearchSpace", "SearchSpaceError"]

_RANGE_KEYS = {"low", "high", "log", "step"}


class SearchSpaceError(LoraConfigError):
    """A sweep's search space names an unknown key, an empty choice list, a range with low > high, or values
    the recipe does not accept."""


def yaml_text(value: Any) -> str:
    """`value` as one line of YAML (``[q_proj, v_proj]``, ``0.001``), as a ``key=value`` override takes it."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def _as_stored(value: Any) -> Any:
    """A choice as Optuna stores it: scalars as they are, anything else as its one-line YAML text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return yaml_text(value)


def _override(key: str, stored: Any) -> str:
    """``key=value`` for `load_run_config`, the value written as YAML."""
    return f"{key}={stored if isinstance(stored, str) else yaml_text(stored)}"


class SearchSpace:
    """Recipe key -> Optuna distribution, validated against a base recipe.

    Args:
        space: ``{key: {choices: [...]}}`` or ``{key: {low, high[, log | step]}}`` per recipe key.
        base_config: the base recipe file the trials start from (None: the embedded defaults); every choice and
            both ends of every range are checked by loading it with that value.
        base_overrides: ``section.key=value`` settings the trials add to the base.

    Raises:
        SearchSpaceError: an unknown key (with the closest valid one), an entry that is neither choices nor a
            range, empty choices, ``low > high``, ``log`` with ``low <= 0`` or with ``step``, or a value the recipe
            rejects.

    Example:
        >>> space = SearchSpace({"lora.r": {"choices": [4, 8]}, "training.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
        >>> sorted(space.distributions)
        ['lora.r', 'training.lr']
        >>> space.overrides({"lora.r": 8, "training.lr": 0.001})
        ['lora.r=8', 'training.lr=0.001']
    """

    def __init__(self, space: Mapping[str, Any], base_config: str | Path | None = None, base_overrides: Sequence[str] = ()) -> None:
        from .recipe import _unknown_key_error, load_run_config, valid_keys

        if not isinstance(space, Mapping) or not space:
            raise SearchSpaceError("the search space is empty: give at least one key, e.g. `lora.r: {choices: [4, 8, 16]}`.")
        keys = set(valid_keys())
        self.distributions = {}
        for key, entry in space.items():
            if key not in keys:
                raise SearchSpaceError(f"search space: {_unknown_key_error(str(key))}")
            self.distributions[key] = self._distribution(key, entry)
        for key, distribution in self.distributions.items():  # every value the sweep may try must load
            for value in self._extremes(distribution):
                try:
                    load_run_config(base_config, [*base_overrides, _override(key, value)])
                except LoraConfigError as err:
                    raise SearchSpaceError(f"search space: {key}={value!r} is not a valid setting ({err})") from None

    @staticmethod
    def _distribution(key: str, entry: Any):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if not isinstance(entry, Mapping):
            raise SearchSpaceError(f"search space: {key} must be {{choices: [...]}} or {{low: ..., high: ...}}, not {entry!r}.")
        if set(entry) == {"choices"}:
            choices = entry["choices"]
            if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
                raise SearchSpaceError(f"search space: {key}.choices must be a non-empty list, not {choices!r}.")
            stored = [_as_stored(choice) for choice in choices]
            if len(set(map(repr, stored))) != len(stored):
                raise SearchSpaceError(f"search space: {key}.choices lists a value twice: {list(choices)!r}.")
            return CategoricalDistribution(stored)
        if not {"low", "high"} <= set(entry) or not set(entry) <= _RANGE_KEYS:
            raise SearchSpaceError(f"search space: {key} must be {{choices: [...]}} or {{low, high}} with optional log or "
                                   f"step; got the keys {sorted(entry)}.")
        low, high, log, step = entry["low"], entry["high"], bool(entry.get("log", False)), entry.get("step")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise SearchSpaceError(f"search space: {key} low and high must be numbers, got {low!r} and {high!r}.")
        if low > high:
            raise SearchSpaceError(f"search space: {key} has low={low} > high={high}: swap them.")
        if log and (low <= 0 or step is not None):
            raise SearchSpaceError(f"search space: {key} with log: true needs low > 0 and no step (low={low}, step={step}).")
        if step is not None and (not isinstance(step, int | float) or isinstance(step, bool) or step <= 0):
            raise SearchSpaceError(f"search space: {key}.step must be a positive number, not {step!r}.")
        if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))

    @staticmethod
    def _extremes(distribution) -> list[Any]:
        if hasattr(distribution, "choices"):
            return list(distribution.choices)
        return [distribution.low, distribution.high]

    def suggest(self, trial) -> dict[str, Any]:
        """One value per key from an Optuna trial (as Optuna stores them).

        Args:
            trial: an ``optuna.Trial``.

        Returns:
            ``{key: value}``.
        """
        from optuna.distributions import CategoricalDistribution, IntDistribution

        params = {}
        for key, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                params[key] = trial.suggest_categorical(key, d.choices)
            elif isinstance(d, IntDistribution):
                params[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
            else:
                params[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        return params

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """``key=value`` overrides for `load_run_config` from a trial's parameters.

        Args:
            params: ``{key: value}`` as `suggest` returns them (or a finished trial's ``params``).

        Returns:
            One ``section.key=value`` string per parameter.
        """
        return [_override(key, value) for key, value in params.items()]
