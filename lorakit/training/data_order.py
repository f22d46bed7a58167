"""The order a run reads its training items in: a pure function of (seed, epoch), so a resumed run, every
process of a multi-process run and `train_together` see the same batches as an uninterrupted single run."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..core.errors import DataError

__all__ = ["batch_indices", "epoch_order"]


def epoch_order(n_items: int, seed: int, epoch: int, batch_size: int, lengths: Sequence[int] | None = None) -> list[int]:
    """The items of one epoch in training order: a seeded permutation, or with `lengths` grouped by length.

    Length grouping (as Hugging Face's ``group_by_length``): the permutation is cut into groups of 50 batches, each
    group sorted by length and cut into batches, and the batches shuffled, so a batch holds items of similar length
    (little padding) while the epoch's order stays random. A pure function of its arguments, as exact resume needs.

    Args:
        n_items: the number of training items.
        seed: the run's seed.
        epoch: the epoch.
        batch_size: the global batch size.
        lengths: each item's token count, to group by; None for a plain permutation.

    Returns:
        A permutation of ``range(n_items)``; consecutive slices of `batch_size` are the epoch's batches.
    """
    order = list(range(n_items))
    shuffle = random.Random(seed * 100_003 + epoch).shuffle
    shuffle(order)
    if lengths is None:
        return order
    group = 50 * batch_size
    batches = []
    for start in range(0, n_items, group):
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    whole, rest = [b for b in batches if len(b) == batch_size], [i for b in batches if len(b) < batch_size for i in b]
    shuffle(whole)
    return [i for batch in whole for i in batch] + rest


def batch_indices(n_items: int, seed: int, step: int, batch_size: int, lengths: Sequence[int] | None = None) -> list[int]:
    """Items of global batch `step`: consecutive slices of each epoch's `epoch_order`.

    Args:
        n_items: the number of training items.
        seed: the run's seed.
        step: the optimizer step (0-based); an epoch is ``n_items // batch_size`` steps.
        batch_size: the global batch size.
        lengths: each item's token count, to group batches by length (None: no grouping).

    Returns:
        The batch's item indices.

    Raises:
        DataError: fewer items than one batch.
    """
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise DataError(f"{n_items} training items are fewer than one batch of {batch_size}: lower training.batch_size or add data.")
    epoch, offset = divmod(step, per_epoch)
    return epoch_order(n_items, seed, epoch, batch_size, lengths)[offset * batch_size : (offset + 1) * batch_size]
