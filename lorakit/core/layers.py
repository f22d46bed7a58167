"""LoRA layers: a frozen base layer plus named low-rank adapters.

Every layer sees its base weight in (out, in) orientation through `weight_view()`; the adapter of name
``n`` is ``A[n]`` (r, in), ``B[n]`` (out, r) and scale ``s[n]``, so ``ΔW = s·B@A`` (Hu et al. 2021, Eq. 3)
for Linear, GPT-2 ``Conv1D`` (weight stored (in, out)) and Embedding (weight (vocab, dim), viewed (dim, vocab))
alike. The algorithms (merging, PiSSA, PLoRA, LoraHub) work on these tensors only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .errors import TargetModuleError
from .inits import InitFn
from .ops import lora_linear
from .routing import RowAdapters, check_rows

__all__ = ["LOW_PRECISION", "SUPPORTED_TYPES", "LoraEmbedding", "LoraLayer", "LoraLinear", "wrap_module"]

SUPPORTED_TYPES = (nn.Linear, Conv1D, nn.Embedding)
LOW_PRECISION = (torch.float16, torch.bfloat16)


class LoraLayer(nn.Module):
    """A frozen ``base_layer`` and adapters keyed by name. Subclasses say how input meets ``A``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowAdapters | None = None
        self._row_cache: tuple | None = None  # (rows, factor versions, per-row A, per-row s·B), no-grad only
        self._unmerged_weight: Tensor | None = None  # exact copy kept while a low-precision weight is merged
        self.initial_factors: dict[str, tuple[Tensor, Tensor]] = {}  # (A0, B0) of inits that moved W (PiSSA, MiLoRA)

    # -- geometry ---------------------------------------------------------------------------------
    def weight_view(self) -> Tensor:
        """The base weight as an (out, in) view sharing storage with the parameter."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (models read ``layer.weight`` for dtypes and tying)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        return self.weight_view().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_view().shape[0]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def factor_like(self) -> Tensor:
        """A tensor with the dtype and device the adapter factors take: the base weight (float32 over a quantised
        base, see `lorakit.core.quantized`)."""
        return self.weight_view()

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, scale: float, dropout: float, init: InitFn | None,
                    before_base_change: Callable[[Tensor], None] | None = None) -> None:
        """Create adapter `name`. ``init=None`` allocates zeros (to be filled from a file).

        ``before_base_change(weight)`` is called with the base weight parameter just before an init that
        moves it (PiSSA, MiLoRA) writes its residual, so a caller can keep an exact copy to roll back to.

        Args:
            name: the new adapter's name.
            rank: rank ``r`` of the factors ``A`` (r, in) and ``B`` (out, r).
            scale: the scale ``s`` of the update ``s·B@A``.
            dropout: dropout probability on the adapter's input (embeddings apply none).
            init: an init strategy ``(W, r, scale) -> (A, B, W_residual)``, or None for zero factors.
            before_base_change: called with the base weight parameter before an init moves it, or None.

        Raises:
            TargetModuleError: an init is run on a weight that is not floating point (quantised or integer).
        """
        self._row_cache = None
        like = self.factor_like()
        if init is None:
            A, B = like.new_zeros(rank, self.in_features), like.new_zeros(self.out_features, rank)
        else:
            A, B, moved = self.init_factors(init, rank, scale, before_base_change)
            if moved:  # the base now holds a residual: keep (A0, B0) to export for the original base
                self.initial_factors[name] = (A.detach().to(like.dtype).clone(), B.detach().to(like.dtype).clone())
        self.lora_A[name] = nn.Parameter(A.to(like.dtype))
        self.lora_B[name] = nn.Parameter(B.to(like.dtype))
        self.scaling[name], self.dropout[name] = scale, dropout

    def init_factors(self, init: InitFn, rank: int, scale: float,
                     before_base_change: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor, bool]:
        """(A, B, whether the base weight moved) from `init` run on the (out, in) weight.

        Args:
            init: an init strategy ``(W, r, scale) -> (A, B, W_residual)``, run on a float32 copy of the weight.
            rank: rank ``r`` of the factors.
            scale: the scale ``s`` the adapter will use.
            before_base_change: called with the base weight parameter before the residual is written, or None.

        Returns:
            ``(A, B, moved)``: ``A`` (r, in), ``B`` (out, r), and True if the residual was written into the base weight.

        Raises:
            TargetModuleError: the base weight is not floating point (quantised or integer).
        """
        return _run_init(init, self.weight_view(), rank, scale, self.base_layer.weight, before_base_change)

    def _shift_base(self, name: str, sign: float) -> None:
        """``W += sign·s·B0@A0`` in float32 for adapter `name`'s initial factors."""
        A0, B0 = self.initial_factors[name]
        weight = self.weight_view()
        with torch.no_grad():
            weight.copy_((weight.float() + sign * self.scaling[name] * (B0.float() @ A0.float())).to(weight.dtype))

    def restore_base(self, name: str) -> None:
        """Undo what adapter `name`'s init did to the base weight (PiSSA/MiLoRA): ``W_res + s·B0@A0``.

        Args:
            name: the adapter; nothing changes unless it has initial factors recorded.
        """
        if name in self.initial_factors:
            self._shift_base(name, +1.0)
            del self.initial_factors[name]

    def residualise(self, name: str) -> None:
        """Turn the original base weight into adapter `name`'s residual ``W - s·B0@A0`` (after loading a
        PiSSA/MiLoRA adapter onto the original model).

        Args:
            name: an adapter whose initial factors are recorded (see `set_initial_factors`).
        """
        self._shift_base(name, -1.0)

    def set_initial_factors(self, name: str, A0: Tensor, B0: Tensor) -> None:
        """Record that adapter `name` was initialised at (A0, B0) with the base holding ``W - s·B0@A0``
        (a PiSSA/MiLoRA adapter read from disk).

        Args:
            name: an adapter of this layer.
            A0: the initial ``A`` (r, in), shaped like ``lora_A[name]``.
            B0: the initial ``B`` (out, r), shaped like ``lora_B[name]``.

        Raises:
            ValueError: the layer has no adapter `name`, or the shapes do not match its factors.
        """
        if name not in self.lora_A or A0.shape != self.lora_A[name].shape or B0.shape != self.lora_B[name].shape:
            raise ValueError(f"initial factors {tuple(A0.shape)}, {tuple(B0.shape)} do not fit adapter {name!r}.")
        dtype = self.weight_view().dtype
        self.initial_factors[name] = (A0.to(dtype), B0.to(dtype))

    def delete_adapter(self, name: str, restore_base: bool = True) -> None:
        """Remove adapter `name`, giving the base weight back what its init took (``restore_base=False``:
        leave the base weight alone, for a caller that restores it bit-exactly itself).

        Args:
            name: the adapter to remove (a name the layer lacks changes nothing).
            restore_base: undo a PiSSA/MiLoRA init's change to the base weight.
        """
        self._row_cache = None
        if restore_base:
            self.restore_base(name)
        self.initial_factors.pop(name, None)
        for table in (self.lora_A, self.lora_B):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.merged_adapters = [n for n in self.merged_adapters if n != name]

    def route_rows(self, rows: RowAdapters | None) -> None:
        """Run each batch row with its own adapter (`rows`) until called with None.

        Args:
            rows: which adapter (or the base) each batch row uses, or None for the active adapters on every row.
        """
        self.row_adapters = rows

    def delta_weight(self, name: str) -> Tensor:
        """``s·B@A`` in float32, (out, in).

        Args:
            name: an adapter of this layer.

        Returns:
            The adapter's weight update ``ΔW`` (out, in), float32.
        """
        return self.scaling[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, in float32, cast back once.

        A bf16/fp16 weight is copied first, so `unmerge` restores it exactly.

        Args:
            names: the adapters to fold in; names the layer lacks or has merged already are skipped.
        """
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        weight = self.weight_view()
        if weight.dtype in LOW_PRECISION and self._unmerged_weight is None:
            self._unmerged_weight = weight.detach().clone()
        with torch.no_grad():
            merged = weight.float() + sum(self.delta_weight(n) for n in names)
            weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight (exactly, for bf16/fp16 weights)."""
        if not self.merged_adapters:
            return
        weight = self.weight_view()
        with torch.no_grad():
            if self._unmerged_weight is not None:
                weight.copy_(self._unmerged_weight)
            else:
                weight.copy_(weight.float() - sum(self.delta_weight(n) for n in self.merged_adapters))
        self._unmerged_weight = None
        self.merged_adapters = []

    # -- forward ----------------------------------------------------------------------------------
    def _pending(self) -> list[str]:
        """Active adapters not already folded into the base weight."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The base layer's output plus that of every active, unmerged adapter (per row in a mixed batch).

        Args:
            x: the input: features (..., in) for Linear/Conv1D, token ids (...) for an embedding.
            *args: further positional inputs of the base layer.
            **kwargs: keyword inputs of the base layer.

        Returns:
            The output (..., out) (``dim`` for an embedding), in the base layer's dtype.

        Raises:
            MixedBatchError: rows are routed and `x` has not one row per routed row.
        """
        if self.row_adapters is not None and not self.disabled:
            return self.base_layer(x, *args, **kwargs) + self._mixed_rows_output(x, self.row_adapters)
        pending = self._pending()
        if len(pending) == 1 and not args and not kwargs:
            fused = self._fused_forward(x, pending[0])
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in pending:
            result = result + self.adapter_output(x, name).to(result.dtype)
        return result

    def _fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        """One-op forward where the layer allows it; None means "use the generic path"."""
        return None

    def adapter_output(self, x: Tensor, name: str) -> Tensor:
        """``s·B(A(dropout(x)))`` for one adapter; subclasses implement it.

        Args:
            x: the layer's input, as for `forward`.
            name: an adapter of this layer.

        Returns:
            The adapter's contribution (..., out), added to the base layer's output.
        """
        raise NotImplementedError

    def _stacked_factors(self, rows: RowAdapters) -> tuple[Tensor, Tensor]:
        """A (slots, r_max, in) and s·B (slots, out, r_max), zero-padded; the last slot is the base (zeros).

        Padding to the largest rank is exact: the extra rows/columns are zero.
        """
        names = [n for n in rows.names if n in self.lora_A]
        r_max = max((self.lora_A[n].shape[0] for n in names), default=1)
        like = self.factor_like()
        A = like.new_zeros(len(rows.names) + 1, r_max, self.in_features)
        B = like.new_zeros(len(rows.names) + 1, self.out_features, r_max)
        for slot, name in enumerate(rows.names):
            if name in self.lora_A:
                rank = self.lora_A[name].shape[0]
                A[slot, :rank] = self.lora_A[name]
                B[slot, :, :rank] = self.scaling[name] * self.lora_B[name]
        return A, B

    def _row_factors(self, rows: RowAdapters) -> tuple[Tensor, Tensor]:
        """Per-row A (batch, r, in) and s·B (batch, out, r) of a mixed batch. Under no_grad they are kept
        while the same batch layout comes again and no factor changed (tensor versions): generation and
        repeated scoring pay the gather once."""
        versions = tuple((self.lora_A[n]._version, self.lora_B[n]._version, self.scaling[n]) for n in rows.names if n in self.lora_A)
        cache = self._row_cache
        if cache is not None and cache[0] is rows and cache[1] == versions:
            return cache[2], cache[3]
        A, sB = self._stacked_factors(rows)
        A_rows, sB_rows = A[rows.row_slot], sB[rows.row_slot]
        self._row_cache = None if torch.is_grad_enabled() else (rows, versions, A_rows, sB_rows)
        return A_rows, sB_rows

    def _mixed_rows_output(self, x: Tensor, rows: RowAdapters) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"adapters(rank)={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


def _run_init(init: InitFn, weight: Tensor, rank: int, scale: float, parameter: Tensor,
              before_base_change: Callable[[Tensor], None] | None) -> tuple[Tensor, Tensor, bool]:
    """Run `init` on a float32 copy of `weight` (a view of `parameter`) and write back its residual,
    calling ``before_base_change(parameter)`` first."""
    if not weight.dtype.is_floating_point:
        raise TargetModuleError(
            f"cannot initialise LoRA on a {weight.dtype} weight (quantised or integer): load the model in float32, "
            "bfloat16 or float16 for the init, then quantise."
        )
    W = weight.detach().float()
    A, B, W_residual = init(W, rank, scale)
    if W_residual is W:
        return A, B, False
    if before_base_change is not None:
        before_base_change(parameter)
    with torch.no_grad():
        weight.copy_(W_residual.to(weight.dtype))
    return A, B, True


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` (weight (out, in)) or GPT-2 ``Conv1D`` (weight (in, out), fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)

    def weight_view(self) -> Tensor:
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def _fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        A, B, weight = self.lora_A[name], self.lora_B[name], self.base_layer.weight
        if torch.is_autocast_enabled() or not (x.dtype == weight.dtype == A.dtype == B.dtype):
            return None
        return lora_linear(
            x, weight, self.base_layer.bias, A, B, self.scaling[name],
            transposed=self.fan_in_fan_out, dropout=self.dropout[name], training=self.training,
        )

    def adapter_output(self, x: Tensor, name: str) -> Tensor:
        """``s·B(A(dropout(x)))`` for one adapter (dropout only in training mode).

        Args:
            x: the input (..., in).
            name: an adapter of this layer.

        Returns:
            The adapter's contribution (..., out), in the adapter's dtype.
        """
        A = self.lora_A[name]
        x = F.dropout(x.to(A.dtype), self.dropout[name], training=self.training and self.dropout[name] > 0)
        return self.scaling[name] * F.linear(F.linear(x, A), self.lora_B[name])  # (..., r) -> (..., out)

    def _mixed_rows_output(self, x: Tensor, rows: RowAdapters) -> Tensor:
        check_rows(x, rows)
        A, sB = self._row_factors(rows)  # (batch, r, in), (batch, out, r)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # (batch, seq, in)
        rates = [self.dropout.get(name, 0.0) for name in rows.names] + [0.0]  # per slot; the base slot has none
        if self.training and any(rates):  # training several adapters at once: each row with its adapter's dropout
            keep = 1 - torch.tensor(rates, device=x3.device, dtype=x3.dtype)[rows.row_slot][:, None, None]  # (batch, 1, 1)
            x3 = x3 * torch.bernoulli(keep.expand_as(x3)) / keep
        xa = torch.bmm(x3, A.transpose(1, 2))  # (batch, seq, r)
        out = torch.bmm(xa, sB.transpose(1, 2))  # (batch, seq, out)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: the adapter looks tokens up in ``Aᵀ`` (vocab, r), then applies ``B``.

    PEFT stores ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r), the same tensors as
    ``A`` and ``B`` here. No dropout on token ids (as PEFT).
    """

    def weight_view(self) -> Tensor:
        return self.base_layer.weight.t()  # (dim, vocab)

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def init_factors(self, init: InitFn, rank: int, scale: float,
                     before_base_change: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor, bool]:
        """Run the init on the transposed problem ``ΔWᵀ = Aᵀ Bᵀ`` so the zero factor sits on the
        vocabulary side, as PEFT's embedding init (A = 0, B random) does.

        Args:
            init: an init strategy ``(W, r, scale) -> (A, B, W_residual)``, run on the (vocab, dim) weight.
            rank: rank ``r`` of the factors.
            scale: the scale ``s`` the adapter will use.
            before_base_change: called with the base weight parameter before the residual is written, or None.

        Returns:
            ``(A, B, moved)``: ``A`` (r, vocab), ``B`` (dim, r), and True if the residual was written into the base weight.

        Raises:
            TargetModuleError: the base weight is not floating point (quantised or integer).
        """
        weight = self.base_layer.weight
        A_t, B_t, moved = _run_init(init, weight, rank, scale, weight, before_base_change)  # (r, dim), (vocab, r)
        return B_t.t().contiguous(), A_t.t().contiguous(), moved

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def adapter_output(self, x: Tensor, name: str) -> Tensor:
        """``s·B(Aᵀ[x])`` for one adapter: the token ids looked up in ``Aᵀ`` (vocab, r), then ``B``.

        Args:
            x: token ids (...).
            name: an adapter of this layer.

        Returns:
            The adapter's contribution (..., dim), in the adapter's dtype.
        """
        after_A = self._lookup(x, self.lora_A[name].t())  # (..., r)
        return self.scaling[name] * F.linear(after_A, self.lora_B[name])  # (..., dim)

    def _mixed_rows_output(self, x: Tensor, rows: RowAdapters) -> Tensor:
        check_rows(x, rows)
        A, sB = self._stacked_factors(rows)  # (slots, r, vocab), (slots, dim, r)
        ids = x.reshape(x.shape[0], -1)  # (batch, seq)
        after_A = A.transpose(1, 2)[rows.row_slot[:, None], ids]  # (batch, seq, r)
        out = torch.bmm(after_A, sB[rows.row_slot].transpose(1, 2))  # (batch, seq, dim)
        return out.reshape(*x.shape, out.shape[-1])


def wrap_module(module: nn.Module) -> LoraLayer:
    """The LoRA wrapper for a supported module type.

    Args:
        module: an ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding`` or bitsandbytes 4-/8-bit linear layer; it becomes
            the wrapper's base layer.

    Returns:
        A `LoraEmbedding` for an embedding, a `LoraQuantLinear` for a quantised linear layer, else a `LoraLinear`,
        holding no adapter yet.

    Raises:
        TargetModuleError: `module` is of another type.
    """
    from .quantized import LoraQuantLinear, is_quantized_linear

    if is_quantized_linear(module):  # before nn.Linear: bitsandbytes' layers subclass it
        return LoraQuantLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Linear, Conv1D)):
        return LoraLinear(module)
    raise TargetModuleError(f"LoRA supports {[t.__name__ for t in SUPPORTED_TYPES]}, not {type(module).__name__}.")
