"""`LoraModel`: wraps a model, injects LoRA layers in place, and manages named adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

from torch import Tensor, nn
from tqdm import tqdm

from .adapter_model import AdapterModel
from .config import LoraConfig
from .errors import LoraConfigError, TargetModuleError
from .inits import get_init, moves_base
from .layers import LoraLayer, wrap_module
from .loading import adapter_parameters, apply_adapter, initial_factors
from .names import BASE_ROW, check_adapter_name
from .peft_format import SavedAdapter, check_adapter_fits
from .saved_modules import ModulesToSave
from .svd import single_torch_thread
from .targeting import AdapterPlan, module_names, plan_targets

__all__ = ["BASE_ROW", "LoraModel", "check_adapter_name", "get_lora_model"]


class LoraModel(AdapterModel):
    """A model with LoRA adapters. Calls and attributes it does not define go to the wrapped model,
    so ``generate``, ``config``, ``save_pretrained`` of the base etc. work as before.

    Args:
        model: the model to adapt; its modules are replaced in place and its own parameters frozen.
        config: the first adapter's `LoraConfig`, or None to add adapters later.
        adapter_name: the first adapter's name.
    """

    config_types: ClassVar[dict[str, type]] = {"LORA": LoraConfig}

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__(model)
        if config is not None:
            self._add_first(adapter_name, config)

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(path, layer) for every LoRA layer, paths relative to the wrapped model.

        Yields:
            ``(path, layer)`` for every `LoraLayer` in the wrapped model.
        """
        return self.modules_of_type(LoraLayer)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, *, initialize: bool = True) -> None:
        """Add adapter `name` with `config`. It becomes active only if no adapter is active yet.

        Any failure leaves the model exactly as it was (see `transaction`).

        Args:
            name: the new adapter's name.
            config: the adapter's `LoraConfig`.
            initialize: run the config's init; False allocates zero factors without running it (used when loading).

        Raises:
            AdapterNameError: the name is invalid or taken.
            LoraConfigError: `config` is not a `LoraConfig`, or a PiSSA/MiLoRA init meets tied weights or a rank
                above min(out, in).
            TargetModuleError: ``target_modules`` or ``modules_to_save`` do not fit the model, or an init meets a
                weight that is not floating point.
        """
        self._check_new(name, config)
        plan = plan_targets(self.model, config)
        if initialize and moves_base(config.init_lora_weights):
            self._refuse_shared_weights(plan)
            _refuse_rank_above_width(plan)
            _refuse_quantized_bases(self.model, plan)
        if any(t.fan_in_fan_out for t in plan.targets) and not config.fan_in_fan_out:
            config = config.replace(fan_in_fan_out=True)  # GPT-2 Conv1D stores weights (in, out)
        with self.transaction():
            self.peft_config[name] = config
            self._inject(name, config, plan, initialize)
            self.set_adapter(self.active_adapters or [name])

    def _refuse_shared_weights(self, plan: AdapterPlan) -> None:
        """PiSSA/MiLoRA rewrite the base weight as a residual; a weight shared with another module (tied
        input/output embeddings) would change there too and the model's output would not be preserved."""
        owners: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        for target in plan.targets:
            names = owners[id(self.model.get_submodule(target.path).weight)]
            if len(names) > 1:
                raise LoraConfigError(
                    f"{target.path!r} shares its weight with {[n for n in names if not n.startswith(target.path + '.')]} "
                    "(tied embeddings); an SVD init would change both. Exclude it from target_modules, or untie the "
                    "weights first (e.g. set the output head's weight to a copy)."
                )

    def _inject(self, name: str, config: LoraConfig, plan: AdapterPlan, initialize: bool) -> None:
        init = get_init(config.init_lora_weights, svd_solver=config.svd_solver, svd_cache=config.svd_cache) if initialize else None
        slow = initialize and moves_base(config.init_lora_weights)
        with single_torch_thread() if slow else contextlib.nullcontext():
            for target in tqdm(plan.targets, desc=f"initialising {name!r}", disable=not slow or len(plan.targets) < 32):
                layer = self.model.get_submodule(target.path)
                if not isinstance(layer, LoraLayer):
                    layer = wrap_module(layer)
                    self._replace(target.path, layer)
                else:
                    self._journal.added.append((layer, name))
                layer.add_adapter(name, target.rank, target.scale, config.lora_dropout, init, self._journal.remember_weight)
        self._add_saved_modules(name, plan.modules_to_save)

    def _set_trainable(self) -> None:
        """Active adapters train (per their bias mode); inactive ones and the base stay frozen."""
        for _, layer in self.lora_layers():
            for name in layer.adapter_names:
                trainable = name in layer.active_adapters
                layer.lora_A[name].requires_grad_(trainable)
                layer.lora_B[name].requires_grad_(trainable)
        for _, wrapper in self.saved_modules():
            for name, module in wrapper.copies.items():
                module.requires_grad_(name in wrapper.active_adapters)
        self._set_bias_trainable()

    def _set_bias_trainable(self) -> None:
        """bias="all": every bias trains; "lora_only": biases of layers an active adapter adapts."""
        modes = {self.peft_config[n].bias for n in self.active_adapters}
        for path in module_names(self.model):
            module = self.model.get_submodule(path)
            if isinstance(module, ModulesToSave):
                continue
            adapted = isinstance(module, LoraLayer) and bool(module.active_adapters)
            bias = getattr(module.base_layer if isinstance(module, LoraLayer) else module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_("all" in modes or ("lora_only" in modes and adapted))

    def unload(self) -> nn.Module:
        """The plain model with every update dropped: original weights (also under PiSSA/MiLoRA
        adapters, whose residual is undone) and original saved modules.

        Returns:
            The wrapped model, its wrappers replaced by the original modules.
        """
        self.unmerge_adapter()
        for _, layer in self.lora_layers():
            for name in list(layer.initial_factors):
                layer.restore_base(name)
        return self._unwrap(keep_trained_copies=False)

    def train(self, mode: bool = True) -> LoraModel:
        """With ``merge_weights=True`` (loralib behaviour): eval() merges the active adapters, train() unmerges.

        Args:
            mode: True for training mode, False for evaluation mode.

        Returns:
            This model.
        """
        nn.Module.train(self, mode)
        if any(self.peft_config[n].merge_weights for n in self.active_adapters):
            if mode:
                self.unmerge_adapter()
            else:
                self.merge_adapter()
        return self

    # -- files (PEFT format) ----------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> Iterator[tuple[str, Tensor]]:
        """(saved key, live tensor) pairs of adapter `name` (see `lorakit.core.loading.adapter_parameters`).

        Args:
            name: the adapter's name.

        Yields:
            ``(key, tensor)`` under PEFT's keys: factors, modules_to_save copies, trained biases.
        """
        yield from adapter_parameters(self, name, with_embedding_bases=False)

    def saved_adapter(self, name: str) -> SavedAdapter:
        """Adapter `name` as written (see `AdapterModel.saved_adapter`), with the PiSSA/MiLoRA initial factors.

        Args:
            name: the adapter's name.

        Returns:
            The `SavedAdapter`.

        Raises:
            AdapterNameError: the model has no adapter `name`.
        """
        adapter = super().saved_adapter(name)
        adapter.initial = initial_factors(self, name)
        return adapter

    def _check_fits(self, model: nn.Module, adapter: SavedAdapter, source) -> None:
        check_adapter_fits(model, adapter, source)

    def _apply_saved(self, name: str, adapter: SavedAdapter, is_trainable: bool) -> None:
        apply_adapter(self, name, adapter.config, adapter.tensors, is_trainable, adapter.initial)


def _refuse_rank_above_width(plan: AdapterPlan) -> None:
    """An SVD init takes r singular components: there are only min(out, in)."""
    for target in plan.targets:
        if target.rank > min(target.out_features, target.in_features):
            raise LoraConfigError(
                f"rank {target.rank} for {target.path!r} exceeds its {min(target.out_features, target.in_features)} singular "
                "values (min(out, in)); PiSSA/MiLoRA need r <= min(out, in). Lower r or use rank_pattern for this module."
            )


def _refuse_quantized_bases(model: nn.Module, plan: AdapterPlan) -> None:
    """PiSSA/MiLoRA write a residual into the base weight, which a quantised layer cannot hold."""
    from .quantized import is_quantized_linear

    for target in plan.targets:
        if is_quantized_linear(model.get_submodule(target.path)):
            raise TargetModuleError(
                f"{target.path!r} is quantised, and this init moves the base weight into a residual (PiSSA/MiLoRA), which a "
                "quantised base cannot hold without re-quantising: use init_lora_weights=True or 'gaussian' on a quantised "
                "base, or run PiSSA/MiLoRA on a float base."
            )


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Inject LoRA layers for `config` into `model` (in place) and return the wrapper.

    On any error `model` is left exactly as it was.

    Args:
        model: the model to adapt; its modules are replaced in place and its own parameters frozen.
        config: the adapter's `LoraConfig`.
        adapter_name: the name of the adapter, which becomes the active one.

    Returns:
        The `LoraModel` wrapping `model`.

    Raises:
        AdapterNameError: `adapter_name` is not a valid adapter name.
        LoraConfigError: `config` is not a `LoraConfig`, or a PiSSA/MiLoRA init meets tied weights or a rank above
            min(out, in).
        TargetModuleError: ``target_modules`` or ``modules_to_save`` do not fit the model.
    """
    return LoraModel(model, config, adapter_name)
