"""Prefix tuning's keys and values as a filled key/value cache (the model's own cache API)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache, EncoderDecoderCache

from .config import PrefixTuningConfig

__all__ = ["prefix_cache"]


def prefix_cache(model: nn.Module, config: PrefixTuningConfig, table: Tensor, batch: int) -> DynamicCache | EncoderDecoderCache:
    """A cache holding every layer's prefix keys and values (Li & Liang 2021, Sec. 4.2: the activations of the
    prefix positions are free parameters), as PEFT lays the table out.

    Args:
        model: the wrapped model (its input embeddings give the dtype).
        config: a resolved `PrefixTuningConfig`.
        table: (num_virtual_tokens, num_layers * 2 * token_dim), keys and values of layer l at rows 2l and 2l+1
            of the middle axis.
        batch: the batch size.

    Returns:
        A `DynamicCache` of length ``num_virtual_tokens``; keys and values (batch, heads, n, head_dim), with gradients.
        Encoder-decoder models (``num_transformer_submodules=2``) get an `EncoderDecoderCache` whose decoder
        self-attention holds the prefix and whose cross-attention is computed as usual; layer l takes rows 4l and
        4l+1 of the table's layer axis written twice over, which is PEFT's layout for these models.
    """
    n, heads = config.num_virtual_tokens, config.num_attention_heads
    dtype = model.get_input_embeddings().weight.dtype
    per_layer = table.to(dtype).view(n, config.num_layers * 2, heads, config.token_dim // heads)  # (n, 2L, heads, hd)
    per_layer = per_layer.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, batch, heads, n, hd)
    if config.num_transformer_submodules == 2:
        doubled = torch.cat([per_layer, per_layer], dim=0)  # (4L, batch, heads, n, hd)
        pairs = [(doubled[4 * layer], doubled[4 * layer + 1]) for layer in range(config.num_layers)]
        return EncoderDecoderCache(DynamicCache(pairs), DynamicCache())
    return DynamicCache([(per_layer[2 * layer], per_layer[2 * layer + 1]) for layer in range(config.num_layers)])
