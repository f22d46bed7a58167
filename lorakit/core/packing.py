"""Padding-free batches: tokenized items packed end to end into rows, each attending only to itself.

A packed row is several items one after another; its position ids restart at 0 at each item, and no
attention mask is passed. Hugging Face models read such position ids as packed sequences and confine
attention to each one (block-diagonal causal attention) in whichever attention implementation they use
(eager, SDPA, flex, flash-attention). The first token of each item gets no label: unpacked, it is never a
target either (nothing precedes it), so a packed batch's summed loss and gradients are the unpacked ones.
The unused tail of a row is padding that forms its own sequence (positions from 0), labelled -100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .chat import IGNORE_INDEX

__all__ = ["collate_packed", "pack_rows", "packed_logprobs"]


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Items assigned to rows of at most `max_length` tokens, first fit by decreasing length.

    Args:
        lengths: each item's token count.
        max_length: a row's capacity; a longer item gets a row of its own.

    Returns:
        Per row, the indices of its items (longest first).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        place = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if place is None:
            rows.append([index])
            room.append(max_length - lengths[index])
        else:
            rows[place].append(index)
            room[place] -= lengths[index]
    return rows


def collate_packed(items: Sequence[dict], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Items ({input_ids, labels}) packed into as few rows as `pack_rows` finds.

    Args:
        items: tokenized items (as from `tokenize_example`).
        pad_id: the token id that fills each row's unused tail.
        max_length: a row's capacity in tokens.

    Returns:
        ``input_ids``, ``position_ids`` and ``labels``, each a long tensor (rows, longest row); no attention mask.
    """
    rows = pack_rows([len(item["input_ids"]) for item in items], max_length)
    width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = len(items[index]["input_ids"])
            ids[r, start : start + n] = torch.tensor(items[index]["input_ids"])
            labels[r, start + 1 : start + n] = torch.tensor(items[index]["labels"][1:], dtype=torch.long)
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the tail: a sequence of its own
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def packed_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled token of a packed batch, with logits only at the positions that predict one.

    Args:
        model: a causal LM whose forward accepts ``logits_to_keep`` as a tensor of positions.
        batch: a packed batch as from `collate_packed`.

    Returns:
        ``(logprobs, mask)``, both (rows, k): float32 log-probabilities (0 where not labelled) and True on labelled
        tokens, over the k positions that predict a labelled token in some row.
    """
    labels = batch["labels"]
    predicting = torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(0)).squeeze(-1)  # (k,) positions t whose t + 1 is labelled
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   logits_to_keep=predicting).logits.float()  # (rows, k, vocab)
    targets = labels[:, predicting + 1]  # (rows, k)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != IGNORE_INDEX
    return logprobs * mask, mask
