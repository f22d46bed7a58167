"""PeriodicLoRA (PLoRA, arXiv 2402.16141): train in stages; at each stage end the adapter is unloaded into
the backbone and started again, so T stages of rank r add up to an update of rank up to T·r at the
memory of rank r.

At an unload point, for every LoRA layer of the adapter, in float32 (Sec. 3, with momentum m):

    W <- W + (1 - m)·s·B@A
    m = 0:  the adapter starts again from its init (A random, B = 0 for LoRA's default init)
    m > 0:  A <- sqrt(m)·A, B <- sqrt(m)·B   (momentum_scaling="sqrt": the adapter keeps m·s·B@A, so the
                                               model's output is the same just before and after)
            A <- m·A,       B <- m·B         (momentum_scaling="linear": the literal reading; the adapter
                                               keeps m²·s·B@A and (m - m²)·s·B@A is dropped each time)

Every stage's factors and coefficient ``c_t = 1 - m`` are recorded, so the total update
``Σ_t c_t·s·B_t@A_t`` (plus the live adapter) can be exported as one adapter for the original base
(`lorakit.plora_export`). bf16/fp16 bases lose nothing: the base becomes ``round(W0 + Σ_t c_t·s·B_t@A_t)``,
computed in float32 from a copy of the original weight and the history, so small updates are never
rounded away one stage at a time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ...core.atomic import atomic_write
from ...core.errors import LoraConfigError
from ...core.inits import get_init, moves_base
from ...core.layers import LOW_PRECISION, LoraEmbedding, LoraLayer
from ...core.lora_model import LoraModel
from ...core.peft_format import b_key, factor_keys
from ...core.quantized import LoraQuantLinear
from .config import PLoRAConfig

__all__ = ["PLoRAConfig", "PeriodicLoRA", "Stage", "read_stages", "stage_factors", "stage_lr_lambda"]



@dataclass
class Stage:
    """One unload: the factors it moved into the base, keyed like the adapter's saved tensors."""

    index: int  # 1, 2, ...
    step: int
    samples: int
    coefficient: float  # c_t = 1 - m
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # A key -> (A (r, in), B (out, r)), float32
    scales: dict[str, float] = field(default_factory=dict)  # A key -> s


def stage_factors(stages: list[Stage], key: str) -> tuple[Tensor, Tensor]:
    """The stages of one layer side by side: ``A_all`` (T·r, in) and ``B_all`` (out, T·r) with each
    coefficient and scale folded into B, so ``B_all @ A_all = Σ_t c_t·s·B_t@A_t``.

    Args:
        stages: the recorded stages (at least one).
        key: the layer's saved A key.

    Returns:
        ``(A_all, B_all)``.
    """
    A_all = torch.cat([stage.factors[key][0] for stage in stages], dim=0)
    B_all = torch.cat([stage.coefficient * stage.scales[key] * stage.factors[key][1] for stage in stages], dim=1)
    return A_all, B_all


def stage_lr_lambda(factor: Callable[[int], float], stage_steps: int) -> Callable[[int], float]:
    """A schedule over one stage, restarted every `stage_steps` steps (``lr_schedule="per_stage"``).

    Args:
        factor: the learning-rate factor of a step within a stage.
        stage_steps: optimizer steps per stage.

    Returns:
        A function of the global step, ``factor(step % stage_steps)`` (for ``LambdaLR``).
    """
    return lambda step: factor(step % stage_steps)


class PeriodicLoRA:
    """Periodic (and momentum) unloading of one adapter of a LoraModel, usable from any training loop:

        plora = PeriodicLoRA(model, PLoRAConfig(unload_every=4800))
        for batch in loader:
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            plora.step(optimizer, samples=len(batch))   # unloads when a stage ends

    ``history_dir``: where stage files are written (one safetensors file per stage, atomically)."""

    def __init__(self, model: LoraModel, config: PLoRAConfig, adapter_name: str | None = None,
                 history_dir: str | os.PathLike | None = None, seed: int = 0) -> None:
        self.model, self.config, self.seed = model, config, seed
        self.name = adapter_name or model.active_adapters[0]
        lora_config = model.peft_config[self.name]
        if moves_base(lora_config.init_lora_weights):
            raise LoraConfigError(
                f"PLoRA re-initialises the adapter at every unload; init_lora_weights={lora_config.init_lora_weights!r} "
                "would move the base weights each time. Use init_lora_weights=True (or 'gaussian') with PLoRA."
            )
        self.init = get_init(lora_config.init_lora_weights)
        self.layers: dict[str, LoraLayer] = {
            factor_keys(path, isinstance(layer, LoraEmbedding))[0]: layer
            for path, layer in model.lora_layers() if self.name in layer.adapter_names
        }
        quantised = [key for key, layer in self.layers.items() if isinstance(layer, LoraQuantLinear)]
        if quantised:
            raise LoraConfigError(
                f"PLoRA unloads the adapter into the base weights, and {quantised[0]} sits on a quantised layer: re-quantising "
                "at every unload would round updates away, and a float copy would give back the memory QLoRA saves. Train "
                "PLoRA on a float32/bfloat16 base, or plain LoRA on the quantised one."
            )
        self.originals = {  # low-precision bases: the original weight, so the base is rounded once from W0 + Σ
            key: layer.weight_view().detach().clone()
            for key, layer in self.layers.items() if layer.weight_view().dtype in LOW_PRECISION
        }
        self.history_dir = Path(history_dir) if history_dir is not None else None
        self.stages: list[Stage] = []
        self.samples = self.steps = 0
        self.unload_seconds = 0.0

    # -- schedule -------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer | None = None, samples: int = 1) -> bool:
        """Count one optimizer step of `samples` samples; unload if a stage ends here.

        Args:
            optimizer: the training optimizer; its state for the adapter is reset at an unload (per
                ``optimizer_state``). None leaves optimizer state alone.
            samples: training samples in this step's global batch.

        Returns:
            True if the adapter was unloaded at this step.
        """
        self.steps += 1
        self.samples += samples
        done = self.samples if self.config.unit == "samples" else self.steps
        if done < (len(self.stages) + 1) * self.config.unload_every:
            return False
        self.unload(optimizer)
        return True

    # -- unloading ------------------------------------------------------------------------------
    def unload(self, optimizer: torch.optim.Optimizer | None = None) -> Stage:
        """Move ``(1 - m)·s·B@A`` of every layer into its base and restart (or shrink) the adapter.

        The stage is recorded (and written to ``history_dir`` when set).

        Args:
            optimizer: the training optimizer; with ``optimizer_state="reset"`` the adapter's moments and step count
                are dropped from it. None leaves optimizer state alone.

        Returns:
            The recorded `Stage`: its index, step, samples, coefficient ``1 - m`` and the float32 factors moved.
        """
        started = time.perf_counter()
        momentum = self.config.momentum
        keep = math.sqrt(momentum) if self.config.momentum_scaling == "sqrt" else momentum
        stage = Stage(len(self.stages) + 1, self.steps, self.samples, 1.0 - momentum)
        for key, layer in self.layers.items():
            A, B = layer.lora_A[self.name], layer.lora_B[self.name]
            stage.factors[key] = (A.detach().float().clone(), B.detach().float().clone())
            stage.scales[key] = layer.scaling[self.name]
        self.stages.append(stage)
        with torch.no_grad(), torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(self.seed * 1_000_003 + stage.index)  # same fresh A on every process and after resume
            for key, layer in self.layers.items():
                self._move_into_base(key, layer, stage)
                self._restart(layer, keep)
        if optimizer is not None and self.config.optimizer_state == "reset":
            self._reset_optimizer(optimizer)
        if self.history_dir is not None:
            write_stage(self.history_dir, stage)
        self.unload_seconds += time.perf_counter() - started
        return stage

    def _move_into_base(self, key: str, layer: LoraLayer, stage: Stage) -> None:
        weight = layer.weight_view()
        if key in self.originals:  # one rounding from the exact float32 total
            weight.copy_((self.originals[key].float() + self.total_delta(key)).to(weight.dtype))
        else:  # float32: in place, no (out, in) temporaries
            A, B = stage.factors[key]
            weight.addmm_(B.to(weight.dtype), A.to(weight.dtype), alpha=stage.coefficient * stage.scales[key])

    def _restart(self, layer: LoraLayer, keep: float) -> None:
        A, B = layer.lora_A[self.name], layer.lora_B[self.name]
        if keep == 0:
            A_new, B_new, moved = layer.init_factors(self.init, A.shape[0], layer.scaling[self.name])
            assert not moved, "PLoRA inits leave the base unchanged"
            A.copy_(A_new.to(A.dtype))
            B.copy_(B_new.to(B.dtype))
        else:
            A.mul_(keep)
            B.mul_(keep)

    def _reset_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Forget the adapter's AdamW moments and step count (they restart at the next step)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        for layer in self.layers.values():
            for parameter in (layer.lora_A[self.name], layer.lora_B[self.name]):
                inner.state.pop(parameter, None)

    def _cuda_devices(self) -> list[torch.device]:
        return sorted({layer.weight.device for layer in self.layers.values() if layer.weight.device.type == "cuda"}, key=str)

    # -- totals ---------------------------------------------------------------------------------
    def total_delta(self, key: str) -> Tensor:
        """``Σ_t c_t·s·B_t@A_t`` unloaded so far into the layer saved under `key`, (out, in), float32.

        Args:
            key: the layer's saved A key (as in the adapter's tensors); at least one stage must be recorded.

        Returns:
            The total update (out, in), float32.
        """
        A_all, B_all = stage_factors(self.stages, key)
        return B_all @ A_all  # (out, T·r) @ (T·r, in)

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The counters a checkpoint needs to resume (the stage factors live in the stage files).

        Returns:
            ``{"stages", "samples", "steps", "unload_seconds"}``: the number of unloads, the samples and optimizer
            steps counted, and the seconds spent unloading.
        """
        return {"stages": len(self.stages), "samples": self.samples, "steps": self.steps, "unload_seconds": self.unload_seconds}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: read its first ``state["stages"]`` stage files, drop later ones (they will be
        redone) and replay the stages onto the freshly loaded original base.

        Args:
            state: what `state_dict` returned when the checkpoint was saved.

        Raises:
            LoraConfigError: this object has unloaded already, or ``history_dir`` holds fewer stage files than
                ``state["stages"]`` (or files with gaps).
        """
        if self.stages:
            raise LoraConfigError("load_state_dict needs a PeriodicLoRA on the original base, before any unload.")
        count = state["stages"]
        device = next(iter(self.layers.values())).weight.device
        stages = read_stages(self.history_dir, device) if self.history_dir is not None else []
        if len(stages) < count:
            raise LoraConfigError(f"the checkpoint has {count} PLoRA stages but {self.history_dir} holds {len(stages)}.")
        for extra in stages[count:]:
            (self.history_dir / _stage_file(extra.index)).unlink(missing_ok=True)
        self.stages = stages[:count]
        with torch.no_grad():
            for key, layer in self.layers.items():  # a low-precision base is rounded once from the whole total
                for stage in self.stages[-1:] if key in self.originals else self.stages:
                    self._move_into_base(key, layer, stage)
        self.samples, self.steps, self.unload_seconds = state["samples"], state["steps"], state["unload_seconds"]


# -- stage files ---------------------------------------------------------------------------------
def _stage_file(index: int) -> str:
    return f"stage-{index:04d}.safetensors"


def write_stage(directory: Path, stage: Stage) -> None:
    """``<dir>/stage-NNNN.safetensors``: A and B per layer (float32) under the adapter's keys, the
    coefficient and scales in the metadata. Written to a temporary name, then renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key_A, (A, B) in stage.factors.items():
        tensors[key_A] = A.detach().to("cpu").contiguous()
        tensors[b_key(key_A)] = B.detach().to("cpu").contiguous()
    metadata = {"index": str(stage.index), "step": str(stage.step), "samples": str(stage.samples),
                "coefficient": repr(stage.coefficient), "scales": json.dumps(stage.scales)}
    atomic_write(directory / _stage_file(stage.index), lambda temporary: save_file(tensors, temporary, metadata=metadata))


def read_stages(directory: str | os.PathLike, device: torch.device | str = "cpu") -> list[Stage]:
    """The stages recorded in `directory`, in order (empty if there are none).

    Args:
        directory: the folder of ``stage-NNNN.safetensors`` files (a run's ``plora/``); it need not exist.
        device: where the factors are loaded.

    Returns:
        The `Stage`s by index, with their factors, coefficients and scales.

    Raises:
        LoraConfigError: the stage indices are not 1, 2, ... without gaps.
    """
    folder = Path(directory)
    stages = []
    for path in sorted(folder.glob("stage-*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata()
            scales = json.loads(meta["scales"])
            factors = {key: (handle.get_tensor(key), handle.get_tensor(b_key(key))) for key in scales}
        stages.append(Stage(int(meta["index"]), int(meta["step"]), int(meta["samples"]), float(meta["coefficient"]), factors, scales))
    if [s.index for s in stages] != list(range(1, len(stages) + 1)):
        raise LoraConfigError(f"{folder} has gaps in its stage files ({[s.index for s in stages]}): it was edited by hand.")
    return stages
