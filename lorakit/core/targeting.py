"""Which modules an adapter touches: pure planning, no mutation.

`plan_targets` resolves ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` /
``rank_pattern`` / ``alpha_pattern`` and ``modules_to_save`` against a model with PEFT's matching rules
and raises before anything is changed, so a bad config never leaves a half-wrapped model behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, LAYERS_PATTERN_REGEX, PATTERN_KEY_REGEX, SAVED_MODULE_REGEX, LoraConfig
from .errors import TargetModuleError
from .layers import SUPPORTED_TYPES, LoraLayer
from .routing import AdapterWrapper

__all__ = ["AdapterPlan", "Target", "matches_spec", "module_names", "plan_modules_to_save", "plan_targets", "with_classifier_heads"]

_SHOWN_NAMES = 25


@dataclass(frozen=True)
class Target:
    """One module to adapt: where it is, its (out, in) shape, rank and scale."""

    path: str
    is_embedding: bool
    fan_in_fan_out: bool
    out_features: int
    in_features: int
    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True)
class AdapterPlan:
    targets: list[Target]
    modules_to_save: list[str]


def module_names(model: nn.Module) -> list[str]:
    """Paths of the model's own modules, skipping the internals of lorakit wrappers.

    Args:
        model: the model, possibly holding `LoraLayer` / `ModulesToSave` wrappers.

    Returns:
        Module paths in ``named_modules`` order, without the root; a wrapper is listed, its children are not.
    """
    names, inside = [], ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        names.append(name)
        if isinstance(module, AdapterWrapper):  # LoRA/IA3 layers, saved modules
            inside = inside + (name + ".",)
    return names


def matches_spec(spec: list[str] | str, path: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches the exact path or a dotted suffix.

    Args:
        spec: module names, or one regex string.
        path: a module path.

    Returns:
        Whether `spec` covers `path`.
    """
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith("." + name) for name in spec)


def _layer_index(config: LoraConfig, path: str) -> int | None:
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(LAYERS_PATTERN_REGEX.format(pattern), path)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(config: LoraConfig, path: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == [] or isinstance(config.target_modules, str):
        return True  # PEFT applies layers_to_transform to list targets only
    index = _layer_index(config, path)
    wanted = [wanted] if isinstance(wanted, int) else wanted
    return index is not None and index in wanted


def pattern_value(patterns: dict, path: str, default):
    """PEFT's `get_pattern_key`: the first key matching the end of the path wins."""
    for key, value in patterns.items():
        if re.match(PATTERN_KEY_REGEX.format(key), path):
            return value
    return default


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _is_target(config: LoraConfig, path: str, module: nn.Module, head: nn.Module | None) -> bool:
    if config.exclude_modules and matches_spec(config.exclude_modules, path):
        return False
    if config.modules_to_save and any(re.match(SAVED_MODULE_REGEX.format(m), path) for m in config.modules_to_save):
        return False
    if config.target_modules == ALL_LINEAR:
        base = _base_of(module)
        return isinstance(base, SUPPORTED_TYPES[:2]) and base is not head
    return matches_spec(config.target_modules, path) and _in_layers(config, path)


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    more = f", ... ({len(names) - _SHOWN_NAMES} more)" if len(names) > _SHOWN_NAMES else ""
    return shown + more


def plan_targets(model: nn.Module, config: LoraConfig) -> AdapterPlan:
    """Resolve the config against `model`; raise `TargetModuleError` if it does not fit.

    Args:
        model: the model to adapt (it may hold lorakit wrappers already); it is not changed.
        config: the adapter's `LoraConfig`.

    Returns:
        The `AdapterPlan`: every target's path, (out, in) shape, rank, alpha and scale, and the modules_to_save paths.

    Raises:
        TargetModuleError: a listed target is not a Linear, Conv1D or Embedding, nothing matches, or a
            ``modules_to_save`` entry matches no module.
    """
    head = _output_head(model)
    names = module_names(model)
    targets = []
    for path in names:
        module = model.get_submodule(path)
        if not _is_target(config, path, module, head):
            continue
        base = _base_of(module)
        if not isinstance(base, SUPPORTED_TYPES):
            if isinstance(config.target_modules, str) or config.target_modules == ALL_LINEAR:
                continue  # a regex may sweep over containers; only leaves of supported types count
            raise TargetModuleError(
                f"target module {path!r} is a {type(base).__name__}; LoRA supports "
                f"{[t.__name__ for t in SUPPORTED_TYPES]}. Name its Linear/Embedding children instead."
            )
        targets.append(_target(config, path, base))
    if not targets:
        raise TargetModuleError(
            f"target_modules={config.target_modules!r} matches no Linear, Conv1D or Embedding module. "
            f"The model's modules include: {_describe(names)}."
        )
    return AdapterPlan(targets, plan_modules_to_save(model, config, names))


def _target(config: LoraConfig, path: str, base: nn.Module) -> Target:
    rank = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    if isinstance(base, nn.Embedding):
        out_features, in_features = base.embedding_dim, base.num_embeddings
    elif isinstance(base, nn.Linear):  # its attributes, not the weight's shape: a quantised weight is packed
        out_features, in_features = base.out_features, base.in_features
    else:
        in_features, out_features = base.weight.shape  # Conv1D stores its weight (in, out)
    fan_in_fan_out = not isinstance(base, (nn.Linear, nn.Embedding))
    return Target(path, isinstance(base, nn.Embedding), fan_in_fan_out, out_features, in_features, rank, alpha, config.scale_for(rank, alpha))


CLASSIFIER_HEADS = ("classifier", "score")  # PEFT trains the head of a SEQ_CLS model as a module to save


def with_classifier_heads(modules_to_save: list[str] | None) -> list[str]:
    """PEFT's rule for ``task_type="SEQ_CLS"``: the classification head (``classifier`` or ``score``) trains too.

    Args:
        modules_to_save: the config's own list, or None.

    Returns:
        The list with both head names added (a model has one of them; the other matches nothing and is skipped).
    """
    found = list(modules_to_save or [])
    return found + [name for name in CLASSIFIER_HEADS if name not in found]


def plan_modules_to_save(model: nn.Module, config, names: list[str]) -> list[str]:
    """Paths of the modules a config's ``modules_to_save`` names (exact paths or dotted suffixes).

    Args:
        model: the model.
        config: any method's config with a ``modules_to_save`` field.
        names: the model's module paths (`module_names`).

    Returns:
        The matching paths, in the order of the config's entries.

    Raises:
        TargetModuleError: an entry matches no module (PEFT's automatic ``classifier``/``score`` entries of a
            ``SEQ_CLS`` config may match nothing).
    """
    paths = []
    # PEFT adds both heads' names for sequence classification; a model has one of them.
    optional = set(CLASSIFIER_HEADS) if getattr(config, "task_type", None) == "SEQ_CLS" else set()
    for wanted in config.modules_to_save or []:
        found = [p for p in names if p == wanted or p.endswith("." + wanted)]
        if not found and wanted in optional:
            continue
        if not found:
            raise TargetModuleError(
                f"modules_to_save entry {wanted!r} matches no module. The model's modules include: {_describe(names)}."
            )
        paths.extend(found)
    return paths
