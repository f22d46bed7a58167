"""The key/value cache under either of its transformers names: ``past_key_values`` (up to 4.x, deprecated in 5.x and
removed in 5.40) and ``cache`` (5.x), for the forward's keyword and the output's field alike."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from transformers import PreTrainedModel

__all__ = ["cache_keyword", "returned_cache"]


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which `model` (or the Hugging Face model it wraps) takes a key/value cache.

    Args:
        model: a Hugging Face model, or a module that wraps one (a lorakit model).

    Returns:
        ``"cache"`` where the model's ``forward`` names it so, else ``"past_key_values"``; for ``forward`` and
        ``generate``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> cache_keyword(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))) in ("cache", "past_key_values")
        True
    """
    hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward returned (``output.cache`` in transformers 5.x, else ``output.past_key_values``),
    or None.

    Args:
        output: a model output (``ModelOutput``) of a forward with ``use_cache=True``.

    Returns:
        The cache object, or None where the model returned none.
    """
    return output.cache if hasattr(type(output), "cache") else getattr(output, "past_key_values", None)
