"""`LSTConfig`: the side network's shape, gates and initialisation (lorakit's own format; PEFT has no LST)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...core.validation import check_range, check_types

__all__ = ["LSTConfig"]


@dataclass
class LSTConfig:
    """Hyper-parameters of a ladder side network (Sung, Cho & Bansal 2022, "LST: Ladder Side-Tuning for Parameter
    and Memory Efficient Transfer Learning", Sec. 3).

    The side network has the backbone's block structure at width d / `reduction_factor` (hidden, feed-forward and
    per-head widths divided, head counts kept, as the official code does). At side block k, fed by backbone block i,
    ``z_k = μ_k · down_k(h_i) + (1 − μ_k) · s_{k−1}`` with ``μ_k = sigmoid(α_k / T)``, then ``s_k = block_k(z_k)``;
    the output is ``head(final_norm(h_L + up(side_norm(s_K))))`` with the backbone's frozen final norm and head.

    Args:
        reduction_factor: r; the side network is 1/r of the backbone's width (the paper's default 8).
        side_layers: backbone block indices that feed a side block (the paper's layer dropping); None: every block.
        gate_temperature: T of the gates (the paper's 0.1).
        gate_init: initial α (0: μ = 0.5, the official code's init).
        init: how side blocks start: ``"magnitude"`` (structural pruning of the backbone block by weight
            magnitude), ``"fisher"`` (by Fisher information on a few batches, the paper's) or ``"random"``.
        fisher_batches: batches used for the Fisher ranking.
        base_model_name_or_path: the base model, written into the saved config.

    Raises:
        LoraConfigError: a field has the wrong type or is out of range.

    Example:
        >>> LSTConfig(reduction_factor=8, side_layers=[1, 2, 3]).gate_temperature
        0.1
    """

    reduction_factor: int = 8
    side_layers: list[int] | None = None
    gate_temperature: float = 0.1
    gate_init: float = 0.0
    init: Literal["magnitude", "fisher", "random"] = "magnitude"
    fisher_batches: int = 8
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        check_range(self.reduction_factor >= 1, "reduction_factor", self.reduction_factor, "use an integer >= 1 (the paper's 8)")
        check_range(self.gate_temperature > 0, "gate_temperature", self.gate_temperature, "use a number > 0 (the paper's 0.1)")
        check_range(self.fisher_batches >= 1, "fisher_batches", self.fisher_batches, "use an integer >= 1")
        layers = self.side_layers
        check_range(layers is None or (len(layers) > 0 and all(i >= 0 for i in layers) and len(set(layers)) == len(layers)),
                    "side_layers", layers, "list distinct block indices >= 0, or null for every block")
        if layers is not None:
            self.side_layers = sorted(layers)
