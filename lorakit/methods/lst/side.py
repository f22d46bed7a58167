"""The ladder side network (LST, Sec. 3.1): a slim copy of the backbone's block structure fed by ladders.

It reads the backbone's block outputs and the keyword arguments its blocks were called with (masks,
positions), never the backbone's autograd graph. For generation it keeps its own key/value cache, in step
with the backbone's (same positions, same mask), under the keyword the backbone's blocks use for theirs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .architectures import Architecture
from .config import LSTConfig

__all__ = ["SideNetwork", "block_keywords"]

CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")  # what a block's cache argument is called, by version
_BACKBONE_ONLY = (*CACHE_KEYWORDS, "use_cache", "position_embeddings", "cache_position")


def block_keywords(block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A block call's arguments after the hidden states, all by keyword (GPT-2 and BERT pass the mask by position).

    Args:
        block: the backbone block that was called.
        args: its positional arguments, the hidden states first.
        kwargs: its keyword arguments.

    Returns:
        Parameter name -> value, without the hidden states (``**kwargs`` parameters flattened in).
    """
    signature = inspect.signature(block.forward)
    bound = signature.bind(*args, **kwargs).arguments
    first = next(iter(signature.parameters))
    keywords: dict[str, Any] = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            keywords.update(value)
        elif name != first:
            keywords[name] = value
    return keywords


def _norm_like(norm: nn.Module | None, width: int) -> nn.Module:
    if norm is None:  # post-norm encoders: every block already ends with its LayerNorm
        return nn.Identity()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    return type(norm)(width, eps=eps)


class SideNetwork(nn.Module):
    """Side blocks at width d/r with one ladder (down-projection d -> d/r) and gate per block, an input
    down-projection of the embeddings, a final norm, and the output: an up-projection d/r -> d for a causal LM
    (zero at init, so the model starts as the backbone), or a classification head on the first token's side state
    for a sequence classifier (LST's head on the side output).

    Args:
        arch: the backbone's `Architecture`.
        config: the `LSTConfig`.
        layers: backbone block indices that feed the side blocks.
    """

    def __init__(self, arch: Architecture, config: LSTConfig, layers: list[int]) -> None:
        super().__init__()
        hidden, width = arch.dims["hidden"], arch.dims["hidden"] // config.reduction_factor
        self.layers = layers
        self.temperature = config.gate_temperature
        self.embed_down = nn.Linear(hidden, width)
        self.ladders = nn.ModuleList(nn.Linear(hidden, width) for _ in layers)
        self.gates = nn.Parameter(torch.full((len(layers),), float(config.gate_init)))  # α; μ = sigmoid(α / T)
        self.blocks = nn.ModuleList(type(arch.blocks[i])(arch.side_config, layer_idx=k) for k, i in enumerate(layers))
        self.norm = _norm_like(arch.final_norm, width)
        self.rotary = type(arch.rotary)(config=arch.side_config) if arch.rotary is not None else None
        for linear in [self.embed_down, *self.ladders]:
            nn.init.normal_(linear.weight, std=0.01)  # the official code's init
            nn.init.zeros_(linear.bias)
        if arch.is_classifier:  # BERT's pooler + classifier, at the side width
            dropout = getattr(arch.side_config, "classifier_dropout", None) or getattr(arch.side_config, "hidden_dropout_prob", 0.1)
            self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, arch.num_labels))
        else:
            self.up = nn.Linear(width, hidden)
            nn.init.zeros_(self.up.weight)  # the model starts as the backbone (as LoRA's B = 0)
            nn.init.zeros_(self.up.bias)

    def gate_values(self) -> Tensor:
        """μ of every side block, (blocks,)."""
        return torch.sigmoid(self.gates / self.temperature)

    def stream(self, embeddings: Tensor, states: dict[int, Tensor], block_kwargs: dict[str, Any], cache: Any = None) -> Tensor:
        """The side stream after the last side block and the final norm.

        Args:
            embeddings: (batch, seq, d) the input of the backbone's first block.
            states: backbone block index -> its output (batch, seq, d).
            block_kwargs: the keyword arguments the backbone's blocks got (masks, positions), see `block_keywords`.
            cache: the side network's own key/value cache (generation), or None.

        Returns:
            (batch, seq, d/r): ``norm(s_K)``.
        """
        kwargs = {k: v for k, v in block_kwargs.items() if k not in _BACKBONE_ONLY}
        if cache is not None:  # under the backbone's own name for it, with the positions it was given
            kwargs |= {k: block_kwargs[k] for k in ("use_cache", "cache_position") if k in block_kwargs}
            kwargs[next((k for k in CACHE_KEYWORDS if k in block_kwargs), "cache")] = cache
        side = self.embed_down(embeddings)  # (batch, seq, d/r)
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(side, kwargs["position_ids"])
        for k, (index, mu) in enumerate(zip(self.layers, self.gate_values())):
            z = mu * self.ladders[k](states[index]) + (1 - mu) * side  # (batch, seq, d/r)
            out = self.blocks[k](z, **kwargs)
            side = out[0] if isinstance(out, tuple) else out
        return self.norm(side)

    def forward(self, embeddings: Tensor, states: dict[int, Tensor], block_kwargs: dict[str, Any], cache: Any = None) -> Tensor:
        """The side network's output.

        Args:
            embeddings: (batch, seq, d) the input of the backbone's first block.
            states: backbone block index -> its output (batch, seq, d).
            block_kwargs: the keyword arguments the backbone's blocks got (see `block_keywords`).
            cache: the side network's own key/value cache (generation), or None.

        Returns:
            Causal LM: (batch, seq, d), ``up(norm(s_K))``, added to the backbone's last hidden state.
            Classifier: (batch, classes), the head on the first token's side state.
        """
        side = self.stream(embeddings, states, block_kwargs, cache)
        return self.head(side[:, 0]) if hasattr(self, "head") else self.up(side)
