"""`LoraConfig`: the adapter's hyper-parameters, with HF PEFT's field names.

A PEFT `adapter_config.json` maps onto this dataclass field for field, and `to_peft_dict` writes one
that PEFT 0.21 reads back. Validation happens on construction, so a bad value fails where it is made.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import LoraConfigError
from .validation import check_regex, check_types

__all__ = ["ALL_LINEAR", "BIAS_MODES", "LoraConfig"]

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

InitSpec = bool | str


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
        for name in ("target_modules", "exclude_modules"):  # PEFT takes sets; keep a stable order
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)) and all(isinstance(v, str) for v in value):
                setattr(self, name, sorted(value))
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        self._validate()

    def _validate(self) -> None:
        from .inits import (  # the registry lives with the strategies
            INIT_STRATEGIES,
            init_name,
        )
        from .svd import solver_names

        _check_rank(self.r, "r")
        _check_alpha(self.lora_alpha, "lora_alpha")
        for key, rank in (self.rank_pattern.items() if isinstance(self.rank_pattern, dict) else ()):
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in (self.alpha_pattern.items() if isinstance(self.alpha_pattern, dict) else ()):
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        if self.target_modules is None:
            raise LoraConfigError(
                "target_modules is not set: name the modules to adapt, e.g. ['q_proj', 'v_proj'], a regex string, "
                f"or {ALL_LINEAR!r}."
            )
        check_types(self)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraConfigError(f"lora_dropout={self.lora_dropout} is out of range: use 0 <= lora_dropout < 1.")
        if init_name(self.init_lora_weights) not in INIT_STRATEGIES:
            raise LoraConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not a known init: use True, False or one of "
                f"{sorted(INIT_STRATEGIES)}."
            )
        if self.svd_solver not in solver_names():
            raise LoraConfigError(f"svd_solver={self.svd_solver!r} is not a solver: use one of {list(solver_names())}.")
        if init_name(self.init_lora_weights) == "milora" and self.svd_solver == "randomized":
            raise LoraConfigError("svd_solver='randomized' finds the largest singular components only; MiLoRA needs the "
                                  "smallest: use 'gram' (the default) or 'exact'.")
        if isinstance(self.svd_cache, str) and not self.svd_cache.strip():
            raise LoraConfigError("svd_cache='' names no folder: use true (the default cache), false, or a folder path.")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if value == "" or (isinstance(value, list) and any(not item for item in value)):
                raise LoraConfigError(f"{name}={value!r} holds an empty name: give module names, e.g. ['q_proj'].")
        layers = self.layers_to_transform
        if any(index < 0 for index in ([layers] if isinstance(layers, int) else layers or [])):
            raise LoraConfigError(f"layers_to_transform={layers!r} holds a negative layer index: indices start at 0.")
        for name, pattern, template in _regexes(self):
            check_regex(pattern, name, template)

    def scale_for(self, rank: int, alpha: float) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

        Args:
            rank: the adapter's rank ``r`` for one module (``r`` or its `rank_pattern` override).
            alpha: the scale numerator for that module (``lora_alpha`` or its `alpha_pattern` override).

        Returns:
            The scale ``s`` of the update ``s * B @ A``.
        """
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
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
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

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (``dataclasses.replace``), validated like a new config.

        Args:
            **changes: field name -> new value.

        Returns:
            The new `LoraConfig`; this one is left unchanged.

        Raises:
            LoraConfigError: a changed value is invalid.
        """
        return dataclasses.replace(self, **changes)


MAX_RANK = 65_536  # far beyond any layer's width; guards against typos allocating terabytes


def _check_rank(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise LoraConfigError(f"{name}={value!r} is not a valid rank: use an integer from 1 to {MAX_RANK}.")


FLOAT32_MAX = 3.4028234663852886e38  # the scale s = alpha / r multiplies float32 tensors


def _check_alpha(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= FLOAT32_MAX:
        raise LoraConfigError(f"{name}={value!r} is not a valid alpha: use a number > 0 that float32 can hold (<= 3.4e38).")


# How user patterns are embedded when matched against module paths (PEFT's rules); `targeting` matches with
# these and validation compiles them, so a pattern is checked exactly as it will be used.
PATTERN_KEY_REGEX = r"(.*\.)?({})$"  # rank_pattern / alpha_pattern keys match the end of a path
SAVED_MODULE_REGEX = r"(^|.*\.){}($|\..*)"  # a modules_to_save entry covers the module and everything inside it
LAYERS_PATTERN_REGEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # layers_pattern: the layer list whose index follows


def _regexes(config: LoraConfig) -> list[tuple[str, str, str]]:
    """(field, pattern, the regex it is embedded in) for every user pattern, as `targeting` uses them."""
    found = [("rank_pattern key", key, PATTERN_KEY_REGEX) for key in config.rank_pattern]
    found += [("alpha_pattern key", key, PATTERN_KEY_REGEX) for key in config.alpha_pattern]
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, str) and value != ALL_LINEAR:
            found.append((name, value, "{}"))
    found += [("modules_to_save", name, SAVED_MODULE_REGEX) for name in config.modules_to_save or []]
    patterns = config.layers_pattern
    for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
        found.append(("layers_pattern", pattern, LAYERS_PATTERN_REGEX))
    return found


def _field_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(LoraConfig) if f.name == name)
