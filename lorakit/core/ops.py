"""Fused LoRA linear: ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` as one autograd function.

One op instead of four (base linear, A, B, scale-and-add) saves the temporaries autograd would keep
(the scaled product, the per-op views) and lets the backward reuse ``g B`` for both the input and the
A gradient. Only what the backward needs is saved: ``x`` (or its dropped-out copy) and ``x Aᵀ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lora_linear"]


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scale: float, transposed: bool):
        W = weight.t() if transposed else weight  # (out, in)
        lora_in = x if x_lora is None else x_lora
        y = F.linear(x, W, bias)  # (..., out)
        xa = F.linear(lora_in, lora_A)  # (..., r)
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_B.t(), alpha=scale)
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, xa)
        ctx.scale, ctx.transposed = scale, transposed
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_lora, weight, lora_A, lora_B, xa = ctx.saved_tensors
        need_x, need_x_lora, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        scale = ctx.scale
        W = weight.t() if ctx.transposed else weight  # (out, in)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        lora_in = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])  # (N, in)
        g_B = g @ lora_B  # (N, r)

        grad_x = grad_x_lora = grad_w = grad_b = grad_A = grad_B = None
        if need_x:
            grad_x = g @ W  # (N, in)
            if x_lora is None:
                grad_x.addmm_(g_B, lora_A, alpha=scale)
            grad_x = grad_x.view(x.shape)
        if need_x_lora:
            grad_x_lora = torch.mm(g_B, lora_A).mul_(scale).view(x_lora.shape)
        if need_w:
            grad_W = g.t() @ x2  # (out, in)
            grad_w = grad_W.t() if ctx.transposed else grad_W
        if need_b:
            grad_b = g.sum(0)
        if need_A:
            grad_A = torch.mm(g_B.t(), lora_in).mul_(scale)  # (r, in)
        if need_B:
            grad_B = torch.mm(g.t(), xa.reshape(-1, xa.shape[-1])).mul_(scale)  # (out, r)
        return grad_x, grad_x_lora, grad_w, grad_b, grad_A, grad_B, None, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    *,
    transposed: bool = False,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``x Wᵀ + b + scale·(dropout(x) Aᵀ) Bᵀ`` in one autograd node.

    Args:
        x: (..., in) input.
        weight: (out, in), or (in, out) with ``transposed=True`` (GPT-2 ``Conv1D``).
        lora_A: (r, in); lora_B: (out, r).
        dropout: dropout probability on the adapter's input (the base path sees ``x`` unchanged).
    """
    x_lora = F.dropout(x, dropout, training=True) if training and dropout > 0 else None
    return _LoraLinear.apply(x, x_lora, weight, bias, lora_A, lora_B, scale, transposed)
