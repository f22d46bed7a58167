"""`modules_to_save`: modules trained in full beside an adapter (a classifier head, an output head), one
trainable copy per adapter, the original kept in ``base_layer``; saved under the module's own keys."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from .errors import MixedBatchError
from .routing import RowAdapters, check_rows

__all__ = ["ModulesToSave", "saved_module_parameters", "saved_module_shapes"]


class ModulesToSave(nn.Module):
    """A module trained in full: a trainable copy per adapter, the original kept in ``base_layer``.

    In a mixed batch each row goes through its own adapter's copy (the original for rows whose adapter
    has none, and for ``"__base__"`` rows), as PEFT routes ``modules_to_save``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowAdapters | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def add_adapter(self, name: str) -> None:
        """Give adapter `name` a trainable deep copy of the original module.

        Args:
            name: the new adapter's name.
        """
        trained = copy.deepcopy(self.base_layer)
        for param in trained.parameters():
            param.requires_grad_(True)
        self.copies[name] = trained

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name`'s copy and remove it from ``active_adapters``.

        Args:
            name: an adapter with a copy here.
        """
        del self.copies[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def route_rows(self, rows: RowAdapters | None) -> None:
        """Run each batch row through its own adapter's copy (`rows`) until called with None.

        Args:
            rows: which adapter (or the original) each batch row uses, or None for the current copy on every row.
        """
        self.row_adapters = rows

    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.copies:
                    return self.copies[name]
        return self.base_layer

    @property
    def weight(self) -> Tensor:
        return self.current().weight

    def forward(self, *args, **kwargs):
        """The output of `current` (the first active adapter's copy, else the original), or per row in a mixed batch.

        Args:
            *args: the wrapped module's positional inputs; in a mixed batch the first one is batch-first and
                every batch-first tensor is split by row.
            **kwargs: the wrapped module's keyword inputs (batch-first tensors split by row in a mixed batch).

        Returns:
            What the wrapped module returns; in a mixed batch, a tensor (batch, ...) with each row from its adapter's copy.

        Raises:
            MixedBatchError: rows are routed and the inputs are keyword-only, have not one row per routed row, or
                the module does not return one tensor row per input row.
        """
        if self.row_adapters is None or self.disabled:
            return self.current()(*args, **kwargs)
        return self._mixed_rows_forward(self.row_adapters, args, kwargs)

    def _mixed_rows_forward(self, rows: RowAdapters, args: tuple, kwargs: dict) -> Tensor:
        """Rows of each adapter through that adapter's copy, put back in batch order."""
        batch = rows.row_slot.shape[0]
        if not args:
            raise MixedBatchError(f"{type(self.base_layer).__name__} saved with the adapter takes keyword inputs only; "
                                  "a mixed-adapter batch cannot split them by row. Run one adapter per call.")
        check_rows(args[0], rows)
        output = None
        for slot, name in enumerate((*rows.names, None)):
            index = (rows.row_slot == slot).nonzero().squeeze(1)  # (rows of this adapter,)
            if index.numel() == 0:
                continue
            module = self.copies[name] if name in self.copies else self.base_layer
            part = module(*_select_rows(args, index, batch), **_select_rows(kwargs, index, batch))
            if not isinstance(part, Tensor) or part.dim() == 0 or part.shape[0] != index.numel():
                raise MixedBatchError(f"{type(self.base_layer).__name__} does not return one tensor row per input row; "
                                      "it cannot take part in a mixed-adapter batch. Run one adapter per call.")
            if output is None:
                output = part.new_zeros((batch, *part.shape[1:]))
            output = output.index_copy(0, index, part)
        return output


def _select_rows(values, index: Tensor, batch: int):
    """`values` (a tuple or dict of arguments) with every batch-first tensor restricted to rows `index`."""
    pick = lambda v: v.index_select(0, index) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v  # noqa: E731
    if isinstance(values, dict):
        return {k: pick(v) for k, v in values.items()}
    return tuple(pick(v) for v in values)


def saved_module_parameters(model: nn.Module, name: str, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """(saved key, live tensor) of adapter `name`'s modules_to_save copies in `model`, keyed `prefix` + path.

    Args:
        model: the wrapped model, holding `ModulesToSave` wrappers.
        name: the adapter's name.
        prefix: PEFT's key prefix (``base_model.model.``; ``base_model.`` for the prompt methods).

    Yields:
        ``(key, parameter or buffer)`` of the adapter's copies.
    """
    for path, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSave) and name in wrapper.copies:
            for key, value in wrapper.copies[name].state_dict(keep_vars=True).items():
                yield f"{prefix}{path}.{key}", value


def saved_module_shapes(model: nn.Module, config: Any, prefix: str) -> dict[str, tuple]:
    """Saved key -> shape of the modules_to_save that `config` names in `model` (plain or wrapped).

    Args:
        model: the model the adapter is for.
        config: any method's config with ``modules_to_save``.
        prefix: PEFT's key prefix, as in `saved_module_parameters`.

    Returns:
        Key -> shape of every tensor of those modules.

    Raises:
        TargetModuleError: an entry matches no module.
    """
    from .targeting import module_names, plan_modules_to_save

    shapes = {}
    for path in plan_modules_to_save(model, config, module_names(model)):
        module = model.get_submodule(path)
        for key, value in getattr(module, "base_layer", module).state_dict().items():
            shapes[f"{prefix}{path}.{key}"] = tuple(value.shape)
    return shapes
