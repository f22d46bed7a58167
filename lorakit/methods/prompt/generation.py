"""``generate`` with virtual tokens or a prefix, through the wrapped model's own ``generate``.

For causal LMs the virtual positions get placeholder ids in front of the caller's ids (with attention
mask 1), so the model's generation loop counts positions and cache lengths itself: prompt tuning and
P-tuning hand it the embeddings of those positions, prefix tuning hands it a cache already holding them.
The placeholders are cut from the result, which is then the caller's ids followed by the new tokens.
Encoder-decoder models get the virtual tokens before the encoder's input (prompt tuning, P-tuning) or the
prefix in the decoder's self-attention cache, with placeholders before the decoder's start token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...core.errors import UnsupportedModelError
from ...core.kv_cache import cache_keyword
from .config import PrefixTuningConfig, PromptLearningConfig
from .prefix import prefix_cache

__all__ = ["generate_with_prompts"]


def generate_with_prompts(model: nn.Module, kind: str, config: PromptLearningConfig, table: Tensor, kwargs: dict) -> Tensor:
    """Run ``model.generate`` with the adapter's virtual tokens (or prefix).

    Args:
        model: the wrapped Hugging Face model.
        kind: ``"causal"`` or ``"seq2seq"`` (see `model_kind`).
        config: the active adapter's resolved config.
        table: the adapter's encoder output (see `PromptModel.prompts`).
        kwargs: ``generate`` keyword arguments with ``input_ids`` (batch, seq) and optionally ``attention_mask``.

    Returns:
        Causal LMs: (batch, seq + new) ids; encoder-decoder models: the decoder's ids (start token first).

    Raises:
        UnsupportedModelError: the model is an encoder, which does not generate.
    """
    kwargs = dict(kwargs)
    input_ids = kwargs.pop("input_ids")
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(input_ids) if mask is None else mask
    batch, n = input_ids.shape[0], config.num_virtual_tokens
    mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (batch, n + seq)
    embeddings = model.get_input_embeddings()
    virtual = table[:n].to(embeddings.weight.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, n, dim)
    if kind == "seq2seq" and isinstance(config, PrefixTuningConfig):
        return _generate_seq2seq_with_prefix(model, config, table, input_ids, mask[:, n:], kwargs)
    if kind == "seq2seq":
        embeds = torch.cat([virtual, embeddings(input_ids)], dim=1)
        return model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    if kind != "causal":
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder; it does not generate text.")
    ids = torch.cat([input_ids.new_zeros(batch, n), input_ids], dim=1)  # placeholders for the virtual positions
    if isinstance(config, PrefixTuningConfig):
        prefix = {cache_keyword(model): prefix_cache(model, config, table, batch)}
        output = model.generate(input_ids=ids, attention_mask=mask, **prefix, **kwargs)
    else:
        embeds = torch.cat([virtual, embeddings(input_ids)], dim=1)  # (batch, n + seq, dim)
        output = model.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    return output[:, n:]


def _generate_seq2seq_with_prefix(model: nn.Module, config: PrefixTuningConfig, table: Tensor, input_ids: Tensor,
                                  mask: Tensor, kwargs: dict) -> Tensor:
    """The prefix sits in the decoder's self-attention cache: the decoder gets placeholders for the prefix positions
    before its start token, so its cache length and positions line up; the placeholders are cut from the result."""
    batch, n = input_ids.shape[0], config.num_virtual_tokens
    start = kwargs.pop("decoder_input_ids", None)
    if start is None:
        start = torch.full((batch, 1), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    decoder_ids = torch.cat([start.new_zeros(batch, n), start], dim=1)  # (batch, n + start)
    output = model.generate(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                            decoder_attention_mask=torch.ones_like(decoder_ids),
                            **{cache_keyword(model): prefix_cache(model, config, table, batch)}, **kwargs)
    return output[:, n:]
