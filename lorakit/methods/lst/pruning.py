"""Side blocks initialised by structural pruning of the backbone's blocks (LST, Sec. 3.2: the side network
starts as a slimmed copy). Each block keeps the top 1/r of its residual dimensions, of its feed-forward units
and of each head's dimensions (one choice shared by all heads; on rotary models whole rotary pairs), ranked by
an importance score per weight: its magnitude, or its Fisher information (squared gradients summed over a few
batches, the paper's ranking). The kept weights are copied exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .architectures import Architecture

__all__ = ["fisher_scores", "kept_indices", "magnitude", "prune_into"]

Scores = Callable[[str, Tensor], Tensor]  # (block parameter name, parameter) -> importance of each entry, same shape


def magnitude(name: str, parameter: Tensor) -> Tensor:
    """Importance by weight magnitude, ``|w|``.

    Args:
        name: the parameter's name in its block (unused; the signature of every score).
        parameter: the weight.

    Returns:
        ``|parameter|`` in float32.
    """
    return parameter.detach().float().abs()


def _axes(arch: Architecture, tensor: Tensor, roles: tuple[str | None, str]) -> list[tuple[str, int]]:
    """(role, tensor axis) pairs of a block parameter."""
    in_role, out_role = roles
    if tensor.dim() == 1:
        return [(out_role, 0)]
    out_axis, in_axis = (1, 0) if arch.stored_in_out else (0, 1)
    return [(out_role, out_axis), (in_role, in_axis)]


def _role_length(arch: Architecture, role: str) -> int:
    d = arch.dims
    return {"hidden": d["hidden"], "ffn": d["ffn"], "q": d["heads"] * d["head_dim"], "kv": d["kv_heads"] * d["head_dim"],
            "qkv": 3 * d["heads"] * d["head_dim"]}[role]


def _top(importance: Tensor, keep: int) -> Tensor:
    return importance.topk(keep).indices.sort().values


def kept_indices(block: nn.Module, arch: Architecture, reduction_factor: int, scores: Scores = magnitude) -> dict[str, Tensor]:
    """Which entries of each role the side block keeps.

    Args:
        block: a backbone block.
        arch: the backbone's `Architecture`.
        reduction_factor: r; each role keeps 1/r of its entries.
        scores: importance of each weight entry (`magnitude`, or Fisher information).

    Returns:
        Role -> sorted indices along that role's axis (``hidden``, ``ffn``, ``q``, ``kv``, ``qkv``, ``head_dim``).
    """
    d, r = arch.dims, reduction_factor
    sums = {"hidden": torch.zeros(d["hidden"]), "ffn": torch.zeros(d["ffn"]), "head_dim": torch.zeros(d["head_dim"])}
    parameters = dict(block.named_parameters())
    for name, roles in arch.roles.items():
        score = scores(name, parameters[name])
        for role, axis in _axes(arch, score, roles):
            other = [a for a in range(score.dim()) if a != axis]
            along = score.sum(dim=other) if other else score  # (length of the role,)
            if role in ("hidden", "ffn"):
                sums[role] += along
            else:  # heads x head_dim (x3 for q|k|v): one choice of head dimensions for every head
                sums["head_dim"] += along.view(-1, d["head_dim"]).sum(0)
    head_dim = d["head_dim"]
    if arch.rotary is not None:  # keep whole rotary pairs (j, j + head_dim / 2), in the side head's order
        half = head_dim // 2
        picks = _top(sums["head_dim"][:half] + sums["head_dim"][half:], half // r)
        dims_kept = torch.cat([picks, picks + half])
    else:
        dims_kept = _top(sums["head_dim"], head_dim // r)
    per_head = lambda heads: (torch.arange(heads)[:, None] * head_dim + dims_kept).flatten()  # noqa: E731
    return {
        "hidden": _top(sums["hidden"], d["hidden"] // r), "ffn": _top(sums["ffn"], d["ffn"] // r), "head_dim": dims_kept,
        "q": per_head(d["heads"]), "kv": per_head(d["kv_heads"]),
        "qkv": torch.cat([part * d["heads"] * head_dim + per_head(d["heads"]) for part in range(3)]),
    }


@torch.no_grad()
def prune_into(side_block: nn.Module, block: nn.Module, arch: Architecture, kept: dict[str, Tensor]) -> None:
    """Copy the kept entries of every role-bearing parameter of `block` into `side_block` (same names).

    Args:
        side_block: the side block (the backbone block's class at the side width).
        block: the backbone block.
        arch: the backbone's `Architecture`.
        kept: role -> indices, from `kept_indices`.
    """
    side, full = dict(side_block.named_parameters()), dict(block.named_parameters())
    for name, roles in arch.roles.items():
        value = full[name]
        for role, axis in _axes(arch, value, roles):
            value = value.index_select(axis, kept[role].to(value.device))
        side[name].copy_(value)


def fisher_scores(model: nn.Module, arch: Architecture, batches: list[dict]) -> dict[int, dict[str, Tensor]]:
    """Fisher information of every block weight: squared gradients of the loss, summed over `batches` (LST's
    ranking for pruning, after Michel et al. / the official code's ``fisher.py``).

    Args:
        model: the backbone (its parameters' requires_grad are restored afterwards).
        arch: its `Architecture`.
        batches: dicts with ``input_ids``, ``labels`` and optionally ``attention_mask``.

    Returns:
        Block index -> parameter name -> summed squared gradient (same shape as the parameter).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    totals = {i: {name: torch.zeros_like(p, dtype=torch.float32) for name, p in block.named_parameters()} for i, block in enumerate(arch.blocks)}
    try:
        model.requires_grad_(False)
        for block in arch.blocks:
            block.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for i, block in enumerate(arch.blocks):
                for name, p in block.named_parameters():
                    if p.grad is not None:
                        totals[i][name] += p.grad.float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    return totals
