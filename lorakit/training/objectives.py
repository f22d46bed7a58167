"""Training objectives: what the trainer needs of a task (how many loss units an item holds, how items become
a batch, the summed loss of a micro-batch). Causal-LM completions and sequence classification."""

from __future__ import annotations

from typing import Protocol

import torch

from ..core.errors import LoraConfigError
from ..core.examples import IGNORE_INDEX, collate, collate_classification, completion_logprobs
from ..core.packing import collate_packed, packed_logprobs

__all__ = ["ClassificationObjective", "CompletionObjective", "PackedCompletionObjective", "TrainingObjective", "check_packing"]


class TrainingObjective(Protocol):
    """What the trainer needs of a task: how many loss units an item holds (tokens, items), and the summed
    loss of a micro-batch. The trainer divides by the global batch's units, so any batching (micro-batches,
    processes) gives the same update."""

    def units(self, item: dict) -> int:
        """How many loss units `item` adds to the global batch's normaliser.

        Args:
            item: one tokenized training item.

        Returns:
            The number of units (e.g. completion tokens, or 1 per item) its loss is summed over.
        """
        ...

    def batch(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`items` padded into the model's keyword arguments, ``labels`` included.

        Args:
            items: tokenized items.

        Returns:
            Name -> tensor.
        """
        ...

    def loss_sum(self, model: torch.nn.Module, items: list[dict], device) -> tuple[torch.Tensor, int]:
        """(summed loss, real tokens processed) of `items`.

        Args:
            model: the model being trained (possibly wrapped by accelerate).
            items: one micro-batch of tokenized items.
            device: where the batch's tensors go.

        Returns:
            ``(loss_sum, tokens)``: the loss summed over the items' units, a scalar tensor with gradients, and the
            number of non-padding input tokens processed (for throughput).
        """
        ...


class CompletionObjective:
    """Causal LM: summed cross-entropy over completion tokens; the unit of normalisation is a token."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def units(self, item: dict) -> int:
        """The completion tokens of `item` (labels other than -100).

        Args:
            item: a tokenized item with ``input_ids`` and ``labels``.

        Returns:
            Its number of labelled tokens.
        """
        return sum(label != IGNORE_INDEX for label in item["labels"])

    def batch(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`items` left-padded into one batch (see `collate`).

        Args:
            items: tokenized items with ``input_ids`` and ``labels``.

        Returns:
            ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``, each (batch, longest item).
        """
        return collate(items, self.pad_id)

    def loss_sum(self, model, items: list[dict], device) -> tuple[torch.Tensor, int]:
        """Cross-entropy summed over the completion tokens of `items` (left-padded into one batch).

        Args:
            model: a causal LM whose forward accepts ``logits_to_keep``.
            items: tokenized items with ``input_ids`` and ``labels``.
            device: where the batch's tensors go.

        Returns:
            ``(loss_sum, tokens)``: the summed loss, a scalar tensor with gradients, and the number of non-padding
            input tokens.
        """
        batch = {k: v.to(device) for k, v in self.batch(items).items()}
        logprobs, _ = completion_logprobs(model, batch)
        return -logprobs.sum(), int(batch["attention_mask"].sum())


class PackedCompletionObjective(CompletionObjective):
    """`CompletionObjective` on padding-free batches: each micro-batch's items packed into rows of `max_length`
    (``training.packing``; see `lorakit.core.packing`). The same summed loss and gradients, no padding computed."""

    def __init__(self, pad_id: int, max_length: int) -> None:
        super().__init__(pad_id)
        self.max_length = max_length

    def batch(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`items` packed into rows (see `collate_packed`).

        Args:
            items: tokenized items with ``input_ids`` and ``labels``.

        Returns:
            ``input_ids``, ``position_ids`` and ``labels``, each (rows, longest row).
        """
        return collate_packed(items, self.pad_id, self.max_length)

    def loss_sum(self, model, items: list[dict], device) -> tuple[torch.Tensor, int]:
        """Cross-entropy summed over the completion tokens of `items`, packed into rows.

        Args:
            model: a causal LM whose forward accepts ``logits_to_keep`` as a tensor of positions.
            items: tokenized items with ``input_ids`` and ``labels``.
            device: where the batch's tensors go.

        Returns:
            ``(loss_sum, tokens)``: the summed loss, a scalar tensor with gradients, and the number of item tokens.
        """
        batch = {k: v.to(device) for k, v in self.batch(items).items()}
        logprobs, _ = packed_logprobs(model, batch)
        return -logprobs.sum(), sum(len(item["input_ids"]) for item in items)


@torch.no_grad()
def check_packing(model: torch.nn.Module, items: list[dict], pad_id: int, device) -> None:
    """Refuse packing for a model whose attention lets packed items see each other.

    The summed loss of two items packed into one row must equal their unpacked loss; a model that ignores the
    restarting position ids (no packed-sequence support) mixes them.

    Args:
        model: the model about to train (evaluated without dropout; its mode is restored).
        items: two or more tokenized items.
        pad_id: the padding token id.
        device: where the model is.

    Raises:
        LoraConfigError: the packed and unpacked losses differ.
    """
    was_training = model.training
    model.eval()
    try:
        width = sum(len(item["input_ids"]) for item in items)
        packed = PackedCompletionObjective(pad_id, width).loss_sum(model, items, device)[0].item()
        padded = CompletionObjective(pad_id).loss_sum(model, items, device)[0].item()
    finally:
        model.train(was_training)
    if abs(packed - padded) > 1e-2 * max(abs(padded), 1.0):
        raise LoraConfigError(
            f"{type(model).__name__} lets packed items attend to each other (packed loss {packed:.4f}, unpacked {padded:.4f}): "
            "its attention does not read restarting position ids as separate sequences. Set training.packing: false "
            "(training.group_by_length: true also saves most padding)."
        )


class ClassificationObjective:
    """Sequence classification: summed cross-entropy over items ({input_ids, label}); the unit is an item."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def units(self, item: dict) -> int:
        """One unit per item: the loss is averaged over items.

        Args:
            item: a tokenized item with ``input_ids`` and ``label``.

        Returns:
            1.
        """
        return 1

    def batch(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`items` right-padded into one batch (see `collate_classification`).

        Args:
            items: tokenized items with ``input_ids`` and ``label``.

        Returns:
            ``input_ids``, ``attention_mask`` (batch, longest item) and ``labels`` (batch,).
        """
        return collate_classification(items, self.pad_id)

    def loss_sum(self, model, items: list[dict], device) -> tuple[torch.Tensor, int]:
        """Cross-entropy of the class logits summed over `items` (right-padded into one batch).

        Args:
            model: a sequence classifier returning ``logits`` (batch, classes).
            items: tokenized items with ``input_ids`` and ``label``.
            device: where the batch's tensors go.

        Returns:
            ``(loss_sum, tokens)``: the summed loss, a scalar tensor with gradients, and the number of non-padding
            input tokens.
        """
        batch = {k: v.to(device) for k, v in self.batch(items).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits  # (batch, classes)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), int(batch["attention_mask"].sum())
