"""(IA)³ layers: a frozen base layer and named scaling vectors (Liu et al. 2022, Sec. 3.3).

An adapter ``n`` is a vector ``l[n]``: (out, 1) scaling the output of an attention projection,
``y = l ⊙ (W x + b)``, or (1, in) scaling the input of a feed-forward module, ``y = W (l ⊙ x) + b``
(PEFT's shapes and keys). Several active adapters multiply. Merging multiplies ``l`` into the weight
(and, for output scaling, the bias); unmerging restores an exact copy kept at merge time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ...core.errors import TargetModuleError
from ...core.routing import RowAdapters, check_rows

__all__ = ["SUPPORTED_TYPES", "IA3Layer"]

SUPPORTED_TYPES = (nn.Linear, Conv1D)


class IA3Layer(nn.Module):
    """A frozen Linear or GPT-2 ``Conv1D`` (``base_layer``) with (IA)³ vectors keyed by adapter name.

    Args:
        base_layer: the module to wrap.
        is_feedforward: scale the input (feed-forward modules) instead of the output.

    Raises:
        TargetModuleError: `base_layer` is neither a Linear nor a Conv1D.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_TYPES):
            raise TargetModuleError(
                f"IA3 wraps {[t.__name__ for t in SUPPORTED_TYPES]}, not a {type(base_layer).__name__}: name its Linear children."
            )
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()  # name -> (out, 1), or (1, in) for feed-forward modules
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowAdapters | None = None
        self._unmerged: tuple[Tensor, Tensor | None] | None = None  # exact (weight, bias) copies while merged

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (models read ``layer.weight`` for dtypes)."""
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    @property
    def in_features(self) -> int:
        """The base layer's input width (a quantised weight's storage is packed)."""
        base = self.base_layer
        return base.in_features if isinstance(base, nn.Linear) else base.weight.shape[0]

    @property
    def out_features(self) -> int:
        """The base layer's output width."""
        base = self.base_layer
        return base.out_features if isinstance(base, nn.Linear) else base.weight.shape[1]

    def _weight_view(self) -> Tensor:
        """The base weight as (out, in), sharing storage (GPT-2's Conv1D stores (in, out))."""
        weight = self.base_layer.weight
        return weight if isinstance(self.base_layer, nn.Linear) else weight.T

    def add_adapter(self, name: str, init_ones: bool) -> None:
        """Create adapter `name`: ``l = 1`` (the model is unchanged), or random values with ``init_ones=False``.

        Args:
            name: the new adapter's name.
            init_ones: start from ones (PEFT's ``init_ia3_weights=True``).
        """
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        weight = self.base_layer.weight
        values = torch.ones(shape) if init_ones else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(values.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`.

        Args:
            name: an adapter this layer holds.
        """
        del self.ia3_l[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def route_rows(self, rows: RowAdapters | None) -> None:
        """Run each batch row with its own adapter (or the base) until called with None.

        Args:
            rows: which adapter each batch row uses, or None.
        """
        self.row_adapters = rows

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        """Multiply the vectors of `names` into the base weight (and bias, for output scaling), in float32.

        Args:
            names: adapters to fold in; ones this layer lacks or has merged already are skipped.

        Raises:
            TargetModuleError: the base weight is quantised (it cannot be rescaled in place).
        """
        names = [n for n in names if n in self.ia3_l and n not in self.merged_adapters]
        if not names:
            return
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        if not weight.is_floating_point():
            raise TargetModuleError(f"IA3 cannot merge into this quantised {type(self.base_layer).__name__}: its weight cannot be "
                                    "rescaled in place. Load the base in float32/bfloat16 to merge, or keep the adapter unmerged.")
        if self._unmerged is None:
            self._unmerged = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        with torch.no_grad():
            view = self._weight_view()
            for name in names:
                scale = self.ia3_l[name].float()  # (out, 1) or (1, in)
                view.copy_((view.float() * scale).to(view.dtype))
                if bias is not None and not self.is_feedforward:
                    bias.copy_((bias.float() * scale.flatten()).to(bias.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the exact base weight and bias from before the first merge."""
        if self._unmerged is None:
            return
        weight, bias = self._unmerged
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
        self._unmerged = None
        self.merged_adapters = []

    # -- forward ----------------------------------------------------------------------------------
    def _scale(self) -> Tensor | None:
        """The product of the active adapters' vectors, flattened to (dim,), or None when none applies."""
        names = [n for n in self.active_adapters if n in self.ia3_l and n not in self.merged_adapters]
        if not names:
            return None
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    def _row_scale(self, x: Tensor, rows: RowAdapters) -> Tensor:
        """Per-row vectors, (batch, 1, ..., dim), ones for rows of the base or of adapters this layer lacks."""
        check_rows(x, rows)
        dim = self.ia3_l[next(iter(self.ia3_l))].numel()
        table = [self.ia3_l[n].flatten() if n in self.ia3_l else None for n in rows.names]
        ones = torch.ones(dim, device=x.device, dtype=x.dtype)
        stacked = torch.stack([ones if t is None else t.to(x.dtype) for t in table] + [ones])  # (adapters + 1, dim)
        per_row = stacked[rows.row_slot]  # (batch, dim)
        return per_row.view(per_row.shape[0], *([1] * (x.dim() - 2)), dim)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The base layer's output, rescaled (or its input rescaled) by the active adapters' vectors.

        Args:
            x: (batch, ..., in) input.
            *args: further positional inputs of the base layer.
            **kwargs: further keyword inputs of the base layer.

        Returns:
            (batch, ..., out) output.

        Raises:
            MixedBatchError: rows are routed and `x` does not have one row per entry.
        """
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            scale = self._row_scale(x, self.row_adapters)
        else:
            scale = self._scale()
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype), *args, **kwargs)  # (batch, ..., in)
        result = self.base_layer(x, *args, **kwargs)
        return result * scale.to(result.dtype)  # (batch, ..., out)
