"""A PLoRA run's whole update as ONE adapter for the original base (its spectra: `diagnostics`).

The total change of a layer is ``ΔW = Σ_t c_t·s·B_t@A_t + s·B@A`` (the stages plus the live adapter).

* exact export: the factors side by side, ``A' = [A_1; ...; A_T; A]``, ``B' = [c_1 s B_1, ..., c_T s B_T, s B]``,
  rank (T+1)·r, ``lora_alpha = r'`` so PEFT's scale is 1;
* compressed export: the best rank-K approximation of ΔW (truncated SVD, Eckart–Young), computed from
  the factors without forming ΔW: ``B' = Q_B R_B``, ``A'ᵀ = Q_A R_A``, SVD of the small core ``R_B R_Aᵀ``.
  The relative error ``||ΔW - ΔW_K||_F / ||ΔW||_F = sqrt(Σ_{i>K} σ_i²) / sqrt(Σ σ_i²)`` is reported.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.config import LoraConfig
from ...core.errors import LoraError
from ...core.peft_format import PREFIX, b_key, is_a_key, read_adapter, write_adapter
from ...core.run_layout import RunLayout
from ...core.targeting import pattern_value
from .periodic import Stage, read_stages, stage_factors

__all__ = ["UpdateFactors", "compress", "export_plora", "live_factors", "run_update", "total_factors"]


@dataclass
class UpdateFactors:
    """``ΔW = B @ A`` of one layer: A (R, in), B (out, R), float32."""

    A: Tensor
    B: Tensor

    def singular_values(self) -> Tensor:
        """The singular values of ``B @ A`` (descending), from the (R, R) core."""
        _, core, _ = _core(self)
        return torch.linalg.svdvals(core)


def _module_path(key_A: str) -> str:
    return key_A[len(PREFIX):].rsplit(".lora_", 1)[0]


def live_factors(config: LoraConfig, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """The factors and scale of every layer of a saved adapter.

    Args:
        config: the adapter's config (its alpha, alpha_pattern and rsLoRA setting give each layer's scale).
        tensors: the adapter's tensors under PEFT's keys.

    Returns:
        A key -> ``(A (r, in), B (out, r), s)``, the factors in float32.
    """
    live = {}
    for key, A in tensors.items():
        if is_a_key(key):
            alpha = pattern_value(config.alpha_pattern, _module_path(key), config.lora_alpha)
            live[key] = (A.float(), tensors[b_key(key)].float(), config.scale_for(A.shape[0], alpha))
    return live


def total_factors(stages: list[Stage], live: dict[str, tuple[Tensor, Tensor, float]]) -> dict[str, UpdateFactors]:
    """Per layer, the stages and the live adapter side by side (coefficients and scales folded into B).

    Args:
        stages: the run's unloads (see `read_stages`); empty for a plain LoRA run.
        live: A key -> (A (r, in), B (out, r), scale s) of the live adapter (see `live_factors`).

    Returns:
        A key -> `UpdateFactors` with A (R, in) and B (out, R), R = (T+1)·r, so that ``B @ A`` is the layer's ΔW.
    """
    total = {}
    for key, (A, B, scale) in live.items():
        if not stages:
            total[key] = UpdateFactors(A, scale * B)
            continue
        A_stages, B_stages = stage_factors(stages, key)
        total[key] = UpdateFactors(torch.cat([A_stages.to(A.device), A]), torch.cat([B_stages.to(B.device), scale * B], dim=1))  # (R, in), (out, R)
    return total


def _core(update: UpdateFactors) -> tuple[Tensor, Tensor, Tensor]:
    Q_B, R_B = torch.linalg.qr(update.B.double())  # (out, R), (R, R)
    Q_A, R_A = torch.linalg.qr(update.A.double().T)  # (in, R), (R, R)
    return Q_B, R_B @ R_A.T, Q_A  # ΔW = Q_B · core · Q_Aᵀ


def compress(update: UpdateFactors, rank: int) -> tuple[UpdateFactors, float]:
    """The best rank-`rank` factors of ``B @ A`` and the relative Frobenius error of dropping the rest.

    Args:
        update: the factors of one layer's ΔW.
        rank: the rank K to keep; one above R keeps all R.

    Returns:
        ``(factors, error)``: float32 factors A (K, in) and B (out, K) of the truncated SVD (square roots of the
        singular values in both), and ``||ΔW - ΔW_K||_F / ||ΔW||_F`` (0 when ΔW is 0).
    """
    Q_B, core, Q_A = _core(update)
    U, S, Vh = torch.linalg.svd(core)  # (R, R), (R,), (R, R)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    B = (Q_B @ U[:, :k]) * root  # (out, k)
    A = root[:, None] * (Vh[:k] @ Q_A.T)  # (k, in)
    total = float(S.square().sum())
    error = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return UpdateFactors(A.float(), B.float()), error


def run_update(run_dir: str | os.PathLike) -> tuple[object, dict[str, Tensor], dict[str, UpdateFactors], list[Stage]]:
    """(adapter config, adapter tensors, per-layer total update, stages) of a training run directory:
    ``adapter/`` (the live adapter at the end) and, for PLoRA runs, ``plora/stage-*.safetensors``.

    Args:
        run_dir: a training run directory (``training.output_dir``).

    Returns:
        ``(config, tensors, total, stages)``: the adapter's `LoraConfig` and saved tensors, A key -> `UpdateFactors`
        of the total update, and the PLoRA stages (empty for a plain LoRA run).

    Raises:
        LoraError: `run_dir` has no ``adapter/`` folder.
        AdapterLoadError: the run's adapter is corrupt.
        LoraConfigError: the stage files have gaps.
    """
    run = RunLayout(run_dir)
    if not run.is_run():
        raise LoraError(f"{run.root} is not a lorakit run directory: it has no adapter/ folder (write one with `lorakit train`).")
    adapter = read_adapter(run.adapter)
    config, tensors = adapter.config, adapter.tensors
    stages = read_stages(run.plora_stages)
    return config, tensors, total_factors(stages, live_factors(config, tensors)), stages


def export_plora(run_dir: str | os.PathLike, directory: str | os.PathLike, rank: int | None = None) -> dict:
    """Write a PLoRA run's total update as one PEFT adapter for the original base: exact (rank (T+1)·r)
    when `rank` is None, else compressed to `rank`.

    Args:
        run_dir: a training run directory (``training.output_dir``).
        directory: the output adapter folder, replaced whole; it also gets ``export_report.json``.
        rank: the rank to compress every layer to by truncated SVD, or None for the exact update.

    Returns:
        The report: ``stages``, ``rank`` (the largest layer rank), ``layers`` and, when compressed,
        ``max_relative_error`` and ``mean_relative_error``.

    Raises:
        LoraError: `run_dir` is not a run directory, or `rank` is below 1.
        AdapterLoadError: the run's adapter is corrupt.
        LoraConfigError: the stage files have gaps.
        AdapterSaveError: `directory` is a file, or a folder holding other things than adapters.
    """
    config, tensors, total, stages = run_update(run_dir)
    if rank is not None and rank < 1:
        raise LoraError(f"--rank {rank}: the compressed rank must be >= 1.")
    out = dict(tensors)  # modules_to_save and trained biases travel unchanged
    errors, ranks = {}, {}
    for key, update in total.items():
        if rank is not None:
            update, errors[key] = compress(update, rank)
        out[key], out[b_key(key)] = update.A.contiguous(), update.B.contiguous()
        ranks[_module_path(key)] = update.A.shape[0]
    r = max(ranks.values())
    rank_pattern = {path: value for path, value in ranks.items() if value != r}
    exported = config.replace(
        r=r, lora_alpha=r, use_rslora=False, init_lora_weights=True, rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),  # alpha = rank everywhere: scale 1
    )
    report = {"stages": len(stages), "rank": r, "layers": len(total)}
    if errors:
        report |= {"max_relative_error": max(errors.values()), "mean_relative_error": sum(errors.values()) / len(errors)}
    report_text = json.dumps(report | {"relative_errors": errors}, indent=2) + "\n"
    write_adapter(directory, exported, out, extra_files={"export_report.json": report_text})
    return report
