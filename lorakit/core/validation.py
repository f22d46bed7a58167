"""One validation style for lorakit's config dataclasses: every field is checked against its type hint.

Bools take bools (``"false"`` is refused, not read as true), numbers are finite ints/floats (never
bools or strings), ``Literal`` fields take one of their values, lists and dicts are checked item by
item. Each class adds its own range checks after `check_types`. Errors are `LoraConfigError` naming
the field, the value and what to use instead.

`coerce` is the one place text becomes a typed value: YAML files and ``section.key=value`` overrides
arrive as text (YAML 1.1 reads ``1e-3`` as a string), so the recipe converts them to the field's type
before the dataclass sees them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Literal, Union

from .errors import LoraConfigError

__all__ = ["check_range", "check_regex", "check_types", "coerce", "describe_type", "is_finite_number"]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def describe_type(hint: Any) -> str:
    """A short English name of a type hint, for messages.

    Args:
        hint: a type hint: a type, a union, a ``Literal``, ``list[...]`` or ``dict[..., ...]``.

    Returns:
        E.g. ``"an integer"``, ``"one of ['none', 'all']"`` or ``"a list of strings or null"``.
    """
    if _is_union(hint):
        return " or ".join(describe_type(arg) for arg in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin is list:
        item = typing.get_args(hint)[0]
        return f"a list of {_PLURALS.get(item, describe_type(item))}"
    if origin is dict:
        key, value = typing.get_args(hint)
        return f"a mapping of {describe_type(key)} to {describe_type(value)}"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_fits(item, typing.get_args(hint)[0]) for item in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint)


def is_finite_number(value: Any) -> bool:
    """Whether `value` is what a ``float`` field takes: a finite int or float, not a bool.

    Args:
        value: any object.

    Returns:
        True for a finite int or float that is not a bool.
    """
    return _fits(value, float)


def check_types(instance: Any, prefix: str = "") -> None:
    """Raise `LoraConfigError` for the first field of a dataclass `instance` whose value does not fit its hint.

    Args:
        instance: a dataclass instance.
        prefix: put before the field's name in the message, e.g. ``"training."``.

    Raises:
        LoraConfigError: a field's value does not fit its type hint (the message says what to use).
    """
    hints = _hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if not _fits(value, hints[field.name]):
            raise LoraConfigError(
                f"{prefix}{field.name}={value!r} ({type(value).__name__}) is not valid: use {describe_type(hints[field.name])}."
            )


def check_range(condition: bool, name: str, value: Any, rule: str) -> None:
    """Raise `LoraConfigError` ``name=value ...: rule`` unless `condition` holds.

    Args:
        condition: whether the value is acceptable.
        name: the field's name as shown, e.g. ``"training.lr"``.
        value: the value, shown with ``repr``.
        rule: what to use instead, ending the message.

    Raises:
        LoraConfigError: `condition` is false.
    """
    if not condition:
        raise LoraConfigError(f"{name}={value!r} is out of range: {rule}.")


def check_regex(pattern: str, name: str, template: str = "{}") -> None:
    """`pattern` must compile where it is used (inside `template`).

    Args:
        pattern: the user's regular expression.
        name: the field's name, for the message.
        template: a format string with ``{}`` where `pattern` goes.

    Raises:
        LoraConfigError: the filled-in template does not compile.
    """
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise LoraConfigError(f"{name}={pattern!r} is not a valid regular expression here: {err}.") from None


_TEXT_TO_BOOL = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def _coerce_one(value: Any, hint: Any) -> Any:
    if _fits(value, hint):
        return value
    if _is_union(hint):
        for arg in typing.get_args(hint):
            converted = _coerce_one(value, arg)
            if _fits(converted, arg):
                return converted
        return value
    if isinstance(value, str):
        text = value.strip()
        if hint is bool and text.lower() in _TEXT_TO_BOOL:
            return _TEXT_TO_BOOL[text.lower()]
        if hint is int and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if hint is float:
            try:
                return float(text)
            except ValueError:
                return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Convert text values read from YAML or the command line to each field's type where they spell one
    (``"1e-3"`` -> 0.001 for a float, ``"false"`` -> False for a bool). Anything else is left for
    `check_types` to refuse with a message.

    Args:
        cls: the dataclass whose field type hints guide the conversion.
        values: field name -> value; names that are not fields pass through unchanged.

    Returns:
        A new dict with the converted values.
    """
    hints = _hints(cls)
    return {key: _coerce_one(value, hints[key]) if key in hints else value for key, value in values.items()}
