"""`IA3Model`: (IA)³ vectors injected into a model in place, with named adapters (`AdapterModel`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from torch import Tensor, nn

from ...core.adapter_model import AdapterModel
from ...core.errors import AdapterLoadError, TargetModuleError
from ...core.peft_format import PREFIX, SavedAdapter, check_tensors
from ...core.saved_modules import saved_module_parameters, saved_module_shapes
from ...core.targeting import matches_spec, module_names, plan_modules_to_save, with_classifier_heads
from .config import IA3Config, default_ia3_modules
from .layers import SUPPORTED_TYPES, IA3Layer

__all__ = ["IA3Model", "get_ia3_model", "plan_ia3_targets", "resolve_config"]


def resolve_config(model: nn.Module, config: IA3Config) -> IA3Config:
    """`config` with PEFT's per-model-type defaults filled in where target/feedforward modules are unset, and for
    ``task_type="SEQ_CLS"`` the classification head among the modules to save (as PEFT).

    Args:
        model: the model to adapt (its ``config.model_type`` picks the defaults).
        config: an `IA3Config`.

    Returns:
        The config the model uses.

    Raises:
        LoraConfigError: no default exists for the model type and target_modules is unset.
    """
    if config.task_type == "SEQ_CLS":
        config = config.replace(modules_to_save=with_classifier_heads(config.modules_to_save))
    if config.target_modules is None or config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        targets, feedforward = default_ia3_modules(model_type)
        config = config.replace(target_modules=config.target_modules or targets,
                                feedforward_modules=config.feedforward_modules if config.feedforward_modules is not None else feedforward)
    return config


def _base(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    return module.base_layer if isinstance(module, IA3Layer) else module


def plan_ia3_targets(model: nn.Module, config: IA3Config) -> list[str]:
    """Paths of the modules a resolved `config` rescales.

    Args:
        model: the model (it may hold (IA)³ layers already); it is not changed.
        config: a config with target modules set (see `resolve_config`).

    Returns:
        The target paths in module order.

    Raises:
        TargetModuleError: a listed target is not a Linear or Conv1D, or nothing matches.
    """
    found = []
    for path in module_names(model):
        if config.exclude_modules and matches_spec(config.exclude_modules, path):
            continue
        if not matches_spec(config.target_modules, path):
            continue
        base = _base(model, path)
        if not isinstance(base, SUPPORTED_TYPES):
            if isinstance(config.target_modules, str):
                continue  # a regex may sweep over containers
            raise TargetModuleError(
                f"IA3 target {path!r} is a {type(base).__name__}; IA3 supports {[t.__name__ for t in SUPPORTED_TYPES]}. "
                "Name its Linear children instead."
            )
        found.append(path)
    if not found:
        raise TargetModuleError(f"target_modules={config.target_modules!r} matches no Linear or Conv1D module of this model.")
    return found


class IA3Model(AdapterModel):
    """A model with (IA)³ adapters: merge/unmerge exact, several named adapters, mixed-adapter batches.

    Args:
        model: the model to adapt; its modules are replaced in place and its own parameters frozen.
        config: the first adapter's `IA3Config`, or None to add adapters later.
        adapter_name: the first adapter's name.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                     num_hidden_layers=2, num_attention_heads=4))
        >>> IA3Model(base, IA3Config()).get_nb_trainable_parameters()[0]  # k, v: 32 each; down_proj: 64 per layer
        256
    """

    config_types: ClassVar[dict[str, type]] = {"IA3": IA3Config}

    def __init__(self, model: nn.Module, config: IA3Config | None = None, adapter_name: str = "default") -> None:
        super().__init__(model)
        if config is not None:
            self._add_first(adapter_name, config)

    def ia3_layers(self) -> Iterator[tuple[str, IA3Layer]]:
        """(path, layer) for every (IA)³ layer, paths relative to the wrapped model.

        Yields:
            ``(path, layer)`` for every `IA3Layer` in the wrapped model.
        """
        return self.modules_of_type(IA3Layer)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: IA3Config) -> None:
        """Add adapter `name`; it becomes active only if no adapter is active yet. A failure changes nothing.

        Args:
            name: the new adapter's name.
            config: its `IA3Config`.

        Raises:
            AdapterNameError: the name is invalid or taken.
            LoraConfigError: `config` is not an `IA3Config`, or has no default targets for this model.
            TargetModuleError: the targets or modules_to_save do not fit the model.
        """
        self._check_new(name, config)
        config = resolve_config(self.model, config)
        targets = plan_ia3_targets(self.model, config)
        saved = plan_modules_to_save(self.model, config, module_names(self.model))
        if any(not isinstance(_base(self.model, p), nn.Linear) for p in targets) and not config.fan_in_fan_out:
            config = config.replace(fan_in_fan_out=True)  # GPT-2 Conv1D stores weights (in, out)
        with self.transaction():
            self.peft_config[name] = config
            for path in targets:
                layer = self.model.get_submodule(path)
                if not isinstance(layer, IA3Layer):
                    layer = IA3Layer(layer, config.is_feedforward(path))
                    self._replace(path, layer)
                else:
                    if layer.is_feedforward != config.is_feedforward(path):
                        raise TargetModuleError(
                            f"{path!r} scales its {'input' if layer.is_feedforward else 'output'} for another adapter; "
                            "adapters of one model must agree on feedforward_modules."
                        )
                    self._journal.added.append((layer, name))
                layer.add_adapter(name, config.init_ia3_weights)
            self._add_saved_modules(name, saved)
            self.set_adapter(self.active_adapters or [name])

    def _set_trainable(self) -> None:
        for _, layer in self.ia3_layers():
            for name, vector in layer.ia3_l.items():
                vector.requires_grad_(name in layer.active_adapters)
        for _, wrapper in self.saved_modules():
            for name, module in wrapper.copies.items():
                module.requires_grad_(name in wrapper.active_adapters)

    # -- files (PEFT format) ----------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> Iterator[tuple[str, Tensor]]:
        """(saved key, live tensor) pairs of adapter `name`: ``base_model.model.<path>.ia3_l`` and modules_to_save.

        Args:
            name: the adapter's name.

        Yields:
            ``(key, tensor)`` under PEFT's keys; the tensors are the model's own parameters.
        """
        for path, layer in self.ia3_layers():
            if name in layer.ia3_l:
                yield f"{PREFIX}{path}.ia3_l", layer.ia3_l[name]
        yield from saved_module_parameters(self.model, name, PREFIX)

    def _check_fits(self, model: nn.Module, adapter: SavedAdapter, source) -> None:
        try:
            config = resolve_config(model, adapter.config)
            targets = plan_ia3_targets(model, config)
        except Exception as err:
            raise AdapterLoadError(f"the adapter in {source} does not fit this model: {err}") from None
        expected = {}
        for path in targets:
            base = _base(model, path)
            out_features, in_features = (base.out_features, base.in_features) if isinstance(base, nn.Linear) else base.weight.shape[::-1]
            expected[f"{PREFIX}{path}.ia3_l"] = (1, in_features) if config.is_feedforward(path) else (out_features, 1)
        check_tensors(adapter.tensors, expected | saved_module_shapes(model, config, PREFIX), source)

    def _apply_saved(self, name: str, adapter: SavedAdapter, is_trainable: bool) -> None:
        with self.transaction():
            self.add_adapter(name, adapter.config)
            self._fill(dict(self.adapter_parameters(name)), adapter.tensors, is_trainable)
        if not is_trainable:
            self.eval()


def get_ia3_model(model: nn.Module, config: IA3Config, adapter_name: str = "default") -> IA3Model:
    """Inject (IA)³ layers for `config` into `model` (in place) and return the wrapper; on error `model` is unchanged.

    Args:
        model: the model to adapt.
        config: the adapter's `IA3Config`.
        adapter_name: the adapter's name, which becomes the active one.

    Returns:
        The `IA3Model` wrapping `model`.

    Raises:
        AdapterNameError: `adapter_name` is not a valid adapter name.
        LoraConfigError: `config` is not an `IA3Config`, or has no default targets for this model.
        TargetModuleError: the targets do not fit the model.
    """
    return IA3Model(model, config, adapter_name)
