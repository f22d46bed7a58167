"""LoRA over a quantised base (QLoRA, Dettmers et al. 2023, Sec. 3): bitsandbytes' 4-bit (NF4 / FP4, with or
without double quantisation) and 8-bit linear layers stay quantised and frozen; the adapter trains beside them
in float32, ``y = Q(W) x + s·B A x`` with ``Q(W)`` the layer's own dequantising matmul.

What needs the real weight works on its dequantised copy and never writes back into the quantised storage
(re-quantising would round every update away a little more each time):

* merging materialises a dense layer ``dequant(W) + Σ s·B A`` (`DequantizedLinear`, in the dtype the weight was
  quantised from, float32 for 8-bit layers) in place of the quantised one; unmerging puts the quantised layer back
  exactly, and ``merge_and_unload()`` so returns a dequantised model with the update folded in;
* inits that move the base weight (PiSSA, MiLoRA) are refused: a quantised base cannot hold their residual.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import TargetModuleError
from .inits import InitFn
from .layers import LoraLinear

__all__ = ["DequantizedLinear", "LoraQuantLinear", "dequantize", "is_quantized_linear"]

_QUANTIZED = ("Linear4bit", "Linear8bitLt")


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer.

    Args:
        module: any module.

    Returns:
        True for ``bnb.nn.Linear4bit`` (and its NF4/FP4 subclasses) and ``bnb.nn.Linear8bitLt``.
    """
    return any(cls.__name__ in _QUANTIZED and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__)


@torch.no_grad()
def dequantize(layer: nn.Module) -> Tensor:
    """The float32 (out, in) weight a bitsandbytes layer computes with.

    Args:
        layer: a 4-bit or 8-bit bitsandbytes linear layer.

    Returns:
        Its dequantised weight, float32.
    """
    import bitsandbytes as bnb

    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:  # 8-bit: int8 rows and their scales (moved to the layer's matmul state by its first forward)
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):  # repacked by an inference forward on the CPU before lorakit
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))  # (bitsandbytes' own inverse)
    return bnb.functional.dequantize_4bit(data, state).float()


class DequantizedLinear(nn.Linear):
    """A dense linear layer standing in for a quantised one: like bitsandbytes' layers it takes inputs of any float
    dtype and answers in the input's dtype (its weight keeps the dtype the quantised weight came from)."""

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` computed in the weight's dtype.

        Args:
            x: (..., in) features.

        Returns:
            (..., out), in `x`'s dtype.
        """
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class LoraQuantLinear(LoraLinear):
    """LoRA around a bitsandbytes 4-bit or 8-bit linear layer (its weight stays quantised; factors in float32).

    Args:
        base_layer: a ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._quantized: nn.Module | None = None  # the quantised layer while a dense merged copy stands in for it

    @property
    def in_features(self) -> int:
        return (self._quantized or self.base_layer).in_features

    @property
    def out_features(self) -> int:
        return (self._quantized or self.base_layer).out_features

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The base's output plus the active adapters' (see `LoraLinear.forward`).

        bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first no-grad forward, and unpacks
        it only approximately; under the wrapper the weight keeps its standard layout (so the dequantised weight a
        merge reads stays exact), and the layer's own setting is back as it was after each call.

        Args:
            x: (..., in) features; further arguments go to the base layer.

        Returns:
            (..., out), in `x`'s dtype.

        Raises:
            TargetModuleError: training (gradients on) through a weight already repacked for bitsandbytes' CPU
                inference kernel, which passes no gradients.
        """
        layer = self.base_layer
        state = getattr(layer.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False) and torch.is_grad_enabled():
            raise TargetModuleError(
                f"this {type(layer).__name__}'s weight was repacked for bitsandbytes' CPU inference kernel (an inference "
                "forward ran before lorakit wrapped it), which passes no gradients: load the model again and set "
                "support_avx512bf16_for_cpu = False on its 4-bit layers before any inference (lorakit's loader does)."
            )
        repack = getattr(layer, "support_avx512bf16_for_cpu", None)
        if repack is None:
            return super().forward(x, *args, **kwargs)
        layer.support_avx512bf16_for_cpu = False
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            layer.support_avx512bf16_for_cpu = repack

    def factor_like(self) -> Tensor:
        """Adapter factors are float32 on the base layer's device (the quantised storage is uint8 / int8)."""
        return torch.empty(0, dtype=torch.float32, device=self.base_layer.weight.device)

    def weight_view(self) -> Tensor:
        """The dense merged weight while adapters are merged.

        Raises:
            TargetModuleError: the layer is quantised (nothing may write into it; see the module's docstring).
        """
        if self._quantized is None:
            raise TargetModuleError(
                f"this {type(self.base_layer).__name__} is quantised: its weight cannot be read or written in place. Merge "
                "with merge_and_unload() (a dequantised model), or load the base in float32/bfloat16 for this operation."
            )
        return self.base_layer.weight

    def init_factors(self, init: InitFn, rank: int, scale: float,
                     before_base_change: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor, bool]:
        """(A, B, False) from `init`, which for the inits a quantised base allows (LoRA's Gaussian / Kaiming A, zero B)
        reads only the weight's shape: it gets a float32 stand-in of that shape that takes no memory.

        Args:
            init: an init strategy ``(W, r, scale) -> (A, B, W_residual)``.
            rank: rank ``r`` of the factors.
            scale: the scale ``s`` the adapter will use.
            before_base_change: unused (the base never changes).

        Returns:
            ``(A, B, False)``.

        Raises:
            TargetModuleError: the init moves the base weight (PiSSA, MiLoRA; `LoraModel` refuses those up front).
        """
        like = self.factor_like()
        W = like.new_zeros(()).expand(self.out_features, self.in_features)  # (out, in), stride 0
        A, B, W_residual = init(W, rank, scale)
        if W_residual is not W:
            raise TargetModuleError(
                "this init moves the base weight into a residual (PiSSA/MiLoRA), which a quantised base cannot hold "
                "without re-quantising: use init_lora_weights=True or 'gaussian' on a quantised base, or run PiSSA/MiLoRA "
                "on a float base."
            )
        return A, B, False

    def merge(self, names: list[str]) -> None:
        """Fold adapters in: a dense layer ``dequant(W) + Σ s·B A`` stands in for the quantised one.

        Args:
            names: the adapters to fold in; names the layer lacks or has merged already are skipped.
        """
        names = [n for n in names if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        if self._quantized is None:
            quantized = self.base_layer
            state = getattr(quantized.weight, "quant_state", None)
            dtype = state.dtype if state is not None else torch.float32  # 4-bit: the dtype the weight was quantised from
            dense = DequantizedLinear(self.in_features, self.out_features, bias=quantized.bias is not None, dtype=dtype,
                                      device=quantized.weight.device).requires_grad_(False)
            with torch.no_grad():
                dense.weight.copy_((dequantize(quantized) + sum(self.delta_weight(n) for n in names)).to(dtype))
                if quantized.bias is not None:
                    dense.bias.copy_(quantized.bias.to(dtype))
            self._quantized, self.base_layer = quantized, dense
            self.merged_adapters.extend(names)
            return
        super().merge(names)

    def unmerge(self) -> None:
        """Put the quantised layer back, exactly as it was."""
        if self._quantized is not None:
            self.base_layer, self._quantized = self._quantized, None
        self._unmerged_weight = None
        self.merged_adapters = []
