"""`IA3Config`: which modules (IA)³ rescales, with HF PEFT's field names (``peft_type`` "IA3")."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import LoraConfigError
from ...core.method_config import MethodConfig
from ...core.validation import check_regex, check_types

__all__ = ["IA3Config", "default_ia3_modules"]

# PEFT's defaults per model type: (target_modules, feedforward_modules).
_DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
}


def default_ia3_modules(model_type: str) -> tuple[list[str], list[str]]:
    """PEFT's default ``(target_modules, feedforward_modules)`` for a transformers ``model_type``.

    Args:
        model_type: ``model.config.model_type``, e.g. ``"llama"``.

    Returns:
        The two module-name lists.

    Raises:
        LoraConfigError: lorakit has no default for this model type.
    """
    if model_type not in _DEFAULT_MODULES:
        raise LoraConfigError(
            f"IA3 has no default target_modules for model type {model_type!r}; set target_modules and feedforward_modules "
            f"(defaults exist for {sorted(_DEFAULT_MODULES)})."
        )
    targets, feedforward = _DEFAULT_MODULES[model_type]
    return list(targets), list(feedforward)


@dataclass
class IA3Config(MethodConfig):
    """Hyper-parameters of one (IA)³ adapter (field names as in ``peft.IA3Config``).

    (IA)³ learns a vector ``l`` per targeted module (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning
    is Better and Cheaper than In-Context Learning", Sec. 3.3): attention projections scale their output,
    ``y = l ⊙ (W x + b)`` with ``l`` (out, 1); feed-forward modules scale their input, ``y = W (l ⊙ x) + b``
    with ``l`` (1, in). ``l`` starts at 1, so the model starts unchanged.

    Args:
        target_modules: module names matched exactly or as a dotted suffix, or a full-match regex; None takes
            PEFT's default for the model type (Llama: k_proj, v_proj, down_proj).
        feedforward_modules: the targets whose input is scaled (a subset of target_modules; PEFT's rule: a path
            ending in one of the names, or a full-match regex); None takes the model type's default.
        exclude_modules: names (or a full-match regex) never adapted.
        fan_in_fan_out: the weight is stored (in, out); set automatically for GPT-2's ``Conv1D``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        init_ia3_weights: start from ``l = 1`` (True) or from random values (False, for tests).
        task_type: PEFT's task type, kept in the file (e.g. ``"CAUSAL_LM"``).
        base_model_name_or_path: the base model, written into the file.

    Raises:
        LoraConfigError: a field has the wrong type, a pattern does not compile, or feedforward modules are not
            among the targets.

    Example:
        >>> IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).peft_type
        'IA3'
    """

    peft_type = "IA3"

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):  # PEFT takes sets; keep a stable order
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)) and all(isinstance(v, str) for v in value):
                setattr(self, name, sorted(value))
        check_types(self)
        for name in ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value == "" or (isinstance(value, list) and any(not item for item in value)):
                raise LoraConfigError(f"{name}={value!r} holds an empty name: give module names, e.g. ['k_proj'].")
            if isinstance(value, str):
                check_regex(value, name)
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
            raise LoraConfigError(
                f"feedforward_modules {sorted(set(feedforward) - set(targets))} are not in target_modules {targets}: "
                "IA3 scales the input of feed-forward targets only, so list them in target_modules too."
            )

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a regex fully matches the path, or the path ends with one of the names.

        Args:
            path: a targeted module's path.

        Returns:
            True where IA3 scales the module's input rather than its output.
        """
        import re

        spec = self.feedforward_modules or []
        if isinstance(spec, str):
            return re.fullmatch(spec, path) is not None
        return any(path.endswith(name) for name in spec)
