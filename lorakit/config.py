"""`LoraConfig`: the adapter's hyper-parameters, with HF PEFT's field names.

A PEFT `adapter_config.json` maps onto this dataclass field for field, and `to_peft_dict` writes one
that PEFT 0.21 reads back. Validation happens on construction, so a bad value fails where it is made.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import LoraConfigError

__all__ = ["LoraConfig", "BIAS_MODES", "ALL_LINEAR"]

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"

# PEFT LoraConfig fields lorakit does not implement, with the value that means "feature off".
# A PEFT config that turns one of them on is refused with a clear message instead of being
# silently loaded as something else.
_PEFT_FEATURES_OFF: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
}
# PEFT keys that carry no meaning for lorakit and are accepted whatever their value.
_PEFT_IGNORED = {
    "peft_type", "peft_version", "auto_mapping", "inference_mode", "revision", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "arrow_config",
    "kasa_config", "velora_config", "monteclora_config", "qalora_group_size", "ensure_weight_tying",
}
# lorakit-only fields: written to adapter_config.json only when they differ from the default,
# so a plain adapter's config is byte-for-byte what PEFT expects.
_LORAKIT_ONLY = ("merge_weights", "svd_solver", "svd_cache")

InitSpec = Union[bool, str]


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (field names as in ``peft.LoraConfig``).

    The update of a targeted weight ``W`` (out x in) is ``s * B @ A`` with ``A`` (r x in), ``B`` (out x r)
    and ``s = lora_alpha / r`` (LoRA, Hu et al. 2021, Sec. 4.1) or ``lora_alpha / sqrt(r)`` with
    ``use_rslora`` (Kalajdzievski 2023, Eq. 5).

    Args:
        r: rank of the update (>= 1).
        lora_alpha: scale numerator (> 0).
        target_modules: module names matched exactly or as a dotted suffix (``["q_proj", "v_proj"]``);
            a string is a full-match regex over module paths; ``"all-linear"`` is every Linear/Conv1D
            except the output head.
        exclude_modules: names (or a full-match regex) never adapted.
        layers_to_transform: only adapt these layer indices (list targets only, as in PEFT).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``...) for ``layers_to_transform``.
        lora_dropout: dropout probability on the adapter's input, ``0 <= p < 1``.
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers).
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        fan_in_fan_out: the weight is stored (in, out); set automatically for GPT-2's ``Conv1D``.
        rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched against the end
            of the module path (PEFT's rule).
        init_lora_weights: a name in the init registry (``lorakit.init.INIT_STRATEGIES``):
            ``True``/``"kaiming"``, ``"gaussian"``; ``False`` makes both factors random (tests).
        merge_weights: loralib / PEFT 0.2 behaviour: ``model.eval()`` merges the active adapters,
            ``model.train()`` unmerges them.
        svd_solver: how PiSSA/MiLoRA find singular components (``lorakit.svd``): "auto", "exact",
            "gram" or "randomized".
        svd_cache: cache decompositions on disk: True (``~/.cache/lorakit/svd``), a folder, or False.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: InitSpec = True
    merge_weights: bool = False
    svd_solver: str = "auto"
    svd_cache: bool | str = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self._validate()

    def _validate(self) -> None:
        from .init import INIT_STRATEGIES, init_name  # the registry lives with the strategies

        _check_rank(self.r, "r")
        _check_alpha(self.lora_alpha, "lora_alpha")
        for key, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise LoraConfigError(f"lora_dropout={self.lora_dropout} is out of range: use 0 <= lora_dropout < 1.")
        if self.bias not in BIAS_MODES:
            raise LoraConfigError(f"bias={self.bias!r} is not a bias mode: use one of {list(BIAS_MODES)}.")
        if init_name(self.init_lora_weights) not in INIT_STRATEGIES:
            raise LoraConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not a known init: use True, False or one of "
                f"{sorted(INIT_STRATEGIES)}."
            )
        from .svd import SOLVER_NAMES

        if self.svd_solver not in SOLVER_NAMES:
            raise LoraConfigError(f"svd_solver={self.svd_solver!r} is not a solver: use one of {list(SOLVER_NAMES)}.")
        if self.target_modules is None:
            raise LoraConfigError(
                "target_modules is not set: name the modules to adapt, e.g. ['q_proj', 'v_proj'], a regex string, "
                f"or {ALL_LINEAR!r}."
            )
        for pattern in _regexes(self):
            try:
                re.compile(pattern)
            except re.error as err:
                raise LoraConfigError(f"{pattern!r} is not a valid regular expression: {err}.") from None

    def scale_for(self, rank: int, alpha: float) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT 0.21 writes for this config."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _LORAKIT_ONLY}
        data.update(_PEFT_FEATURES_OFF)
        data.update(peft_type="LORA", inference_mode=True, revision=None)
        for name in _LORAKIT_ONLY:
            if getattr(self, name) != _field_default(name):
                data[name] = getattr(self, name)
        return dict(sorted(data.items()))

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build a config from a PEFT ``adapter_config.json`` dict, refusing features lorakit lacks."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraConfigError(f"peft_type={data['peft_type']!r}: lorakit reads only LoRA adapters (peft_type 'LORA').")
        for key, off in _PEFT_FEATURES_OFF.items():
            if data.get(key, off) not in (off, None, False, [], {}):
                raise LoraConfigError(f"this adapter uses PEFT's {key}={data[key]!r}, which lorakit does not support.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = sorted(set(data) - known - set(_PEFT_FEATURES_OFF) - _PEFT_IGNORED)
        if unknown and any(data[k] not in (None, False, [], {}) for k in unknown):
            raise LoraConfigError(f"adapter_config.json has options lorakit does not know: {unknown}.")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


def _check_rank(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraConfigError(f"{name}={value!r} is not a valid rank: use an integer >= 1.")


def _check_alpha(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LoraConfigError(f"{name}={value!r} is not a valid alpha: use a number > 0.")


def _regexes(config: LoraConfig) -> list[str]:
    patterns = list(config.rank_pattern) + list(config.alpha_pattern)
    for value in (config.target_modules, config.exclude_modules):
        if isinstance(value, str) and value != ALL_LINEAR:
            patterns.append(value)
    return patterns


def _field_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(LoraConfig) if f.name == name)
