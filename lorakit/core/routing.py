"""Mixed-adapter batches: which adapter each batch row uses, and the interface every wrapper kind implements.

`LoraModel(..., adapter_names=[...])` builds one `RowAdapters` and hands it to every wrapper in the model
(`route_rows`); each wrapper runs every row with its own adapter, or refuses with `MixedBatchError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import MixedBatchError
from .names import BASE_ROW

__all__ = ["AdapterWrapper", "RowAdapters", "check_rows"]


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses in a mixed batch: ``names[row_slot[i]]``, or the base model
    where ``row_slot[i] == len(names)``."""

    names: tuple[str, ...]
    row_slot: Tensor  # (batch,) int64

    @classmethod
    def for_rows(cls, adapter_names: Sequence[str], unique: Sequence[str], device) -> RowAdapters:
        """The routing of one batch: row i uses ``adapter_names[i]`` (``"__base__"``: the base model).

        Args:
            adapter_names: one name per row.
            unique: the adapter names among them, in first-seen order, without ``"__base__"``.
            device: where ``row_slot`` goes.

        Returns:
            The `RowAdapters`.
        """
        slot = {name: i for i, name in enumerate(unique)} | {BASE_ROW: len(unique)}
        return cls(tuple(unique), torch.tensor([slot[n] for n in adapter_names], device=device))


@runtime_checkable
class AdapterWrapper(Protocol):
    """What `LoraModel` needs of every module kind it puts into a model (LoRA layers, saved modules):
    a wrapped original, adapters keyed by name, and per-row routing for mixed batches.

    A wrapper that cannot route rows must raise `MixedBatchError` from its forward while rows are set,
    never silently use one adapter for every row.
    """

    base_layer: nn.Module
    active_adapters: list[str]
    disabled: bool

    @property
    def adapter_names(self) -> list[str]: ...

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`: its parameters go and it leaves ``active_adapters``.

        Args:
            name: an adapter this wrapper holds.
        """
        ...

    def route_rows(self, rows: RowAdapters | None) -> None:
        """Run each batch row of the following forwards with its own adapter (or the base), until called with None.

        Args:
            rows: which adapter each batch row uses, or None to go back to ``active_adapters`` for every row.
        """
        ...


def check_rows(x: Tensor, rows: RowAdapters) -> None:
    """Raise `MixedBatchError` unless `x` is batch-first with one row per entry of `rows`.

    Args:
        x: a layer's input, (batch, ...).
        rows: the mixed batch's routing.

    Raises:
        MixedBatchError: `x` is not a tensor with ``rows.row_slot.shape[0]`` rows.
    """
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != rows.row_slot.shape[0]:
        raise MixedBatchError(
            f"adapter_names has {rows.row_slot.shape[0]} entries but the batch has {x.shape[0]} rows: "
            "pass one adapter name (or '__base__') per row."
        )
