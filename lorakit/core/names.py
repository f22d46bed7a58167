"""Adapter names: what a name may be. Adapters are kept in module dicts under their names and saved in
folders named after them, so a name must be a safe identifier that shadows no attribute."""

from __future__ import annotations

import functools
import re

from .errors import AdapterNameError

__all__ = ["BASE_ROW", "check_adapter_name"]

BASE_ROW = "__base__"  # the adapter name that means "no adapter" in a mixed batch
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: object) -> None:
    """Raise `AdapterNameError` unless `name` can name an adapter: 1-64 letters, digits, ``_`` or ``-``,
    and not an attribute of the wrappers (``training``, ``forward``, ``keys``...), since adapters are
    kept in module dicts under their names and saved in folders named after them.

    Args:
        name: the candidate name (any object; only strings can pass).

    Raises:
        AdapterNameError: `name` is not such a string, is ``"__base__"`` (reserved for base-model rows of
            mixed batches), or is an attribute name of lorakit's wrappers.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterNameError(
            f"adapter name {name!r} is not valid: use 1 to 64 letters, digits, '_' or '-' (e.g. 'default', 'task-1')."
        )
    if name == BASE_ROW:
        raise AdapterNameError(f"{BASE_ROW!r} is reserved for base-model rows in mixed batches; pick another name.")
    if name in reserved_names():
        raise AdapterNameError(f"adapter name {name!r} is an attribute name of lorakit's wrappers; pick another name.")



@functools.cache
def reserved_names() -> frozenset[str]:
    """Attribute names (of classes and of live instances) of the modules that key adapters by name."""
    import torch
    from torch import nn

    from .layers import wrap_module
    from .lora_model import LoraModel
    from .saved_modules import ModulesToSave

    with torch.random.fork_rng(devices=[]):  # probing must not move the global RNG (adapter inits draw from it)
        probe = nn.Linear(1, 1)
        instances = (LoraModel(nn.Linear(1, 1)), wrap_module(probe), ModulesToSave(probe), nn.ModuleDict(), nn.ParameterDict())
    return frozenset(name for instance in instances for name in dir(instance))
