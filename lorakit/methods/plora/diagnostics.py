"""What a run's total update looks like: effective rank per layer (Roy & Vetterli 2007), the singular-value
spectrum of ΔW, and the loss with PLoRA's unload points, as one PNG (`lorakit info RUN_DIR`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ...core.plotting import pyplot, save_png
from ...core.run_layout import RunLayout
from .export import run_update

__all__ = ["effective_rank", "plot_diagnostics"]


def effective_rank(S: Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p_i = σ_i / Σσ``: 1 for one direction, n for n equal ones.

    Args:
        S: the singular values (>= 0), a 1-D tensor.

    Returns:
        The effective rank; 0.0 when every value is 0.
    """
    p = S.double() / S.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0



def plot_diagnostics(runs: dict[str, str | os.PathLike], path: str | os.PathLike) -> dict[str, dict]:
    """One PNG for runs labelled ``{label: run_dir}``: per-layer effective rank of the total update, the
    mean normalised singular-value spectrum, and the training loss with the unload points marked.

    Args:
        runs: label -> training run directory.
        path: where the PNG goes.

    Returns:
        Per label: ``{"stages": T, "stored_ranks": [...], "effective_ranks": [...]}``, one rank of ΔW per layer.

    Raises:
        LoraError, AdapterLoadError, LoraConfigError: a run cannot be read (see `run_update`).
    """
    plt = pyplot()

    figure, (rank_axis, spectrum_axis, loss_axis) = plt.subplots(1, 3, figsize=(16, 4.5))
    ranks = {}
    for label, run_dir in runs.items():
        _, _, total, stages = run_update(run_dir)
        spectra = [update.singular_values() for update in total.values()]
        ranks[label] = {"stages": len(stages), "stored_ranks": [update.A.shape[0] for update in total.values()],
                         "effective_ranks": [effective_rank(S) for S in spectra]}
        rank_axis.plot(ranks[label]["effective_ranks"], label=label)
        length = max(S.shape[0] for S in spectra)
        padded = torch.stack([torch.nn.functional.pad(S / S[0], (0, length - S.shape[0])) for S in spectra])
        spectrum_axis.semilogy(padded.mean(0).clamp(min=1e-8).numpy(), label=label)
        _plot_loss(loss_axis, Path(run_dir), label, [stage.step for stage in stages])
    rank_axis.set(xlabel="adapted layer (model order)", ylabel="effective rank of ΔW", title="effective rank per layer")
    spectrum_axis.set(xlabel="singular value index", ylabel="σ_i / σ_1 (mean over layers)", title="spectrum of ΔW")
    loss_axis.set(xlabel="optimizer step", ylabel="training loss", title="loss (dotted: unloads)")
    for axis in (rank_axis, spectrum_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, path, dpi=110)
    return ranks


def _plot_loss(axis, run_dir: Path, label: str, unload_steps: list[int]) -> None:
    metrics = RunLayout(run_dir).metrics
    if not metrics.is_file():
        return
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    line, = axis.plot([m["step"] for m in history], [m["loss"] for m in history], label=label, alpha=0.7)
    for step in unload_steps:
        axis.axvline(step, color=line.get_color(), linestyle=":", alpha=0.6)
