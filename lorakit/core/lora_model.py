"""`LoraModel`: wraps a model, injects LoRA layers in place, and manages named adapters."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .config import LoraConfig
from .errors import AdapterNameError, LoraConfigError, LoraError, MixedBatchError
from .inits import get_init, moves_base
from .journal import Journal
from .layers import LoraLayer, wrap_module
from .loading import apply_adapter, load_adapter, saved_adapter
from .names import BASE_ROW, check_adapter_name
from .peft_format import check_adapter_fits, read_adapter, write_adapters
from .routing import RowAdapters
from .saved_modules import ModulesToSave
from .svd import single_torch_thread
from .targeting import AdapterPlan, module_names, plan_targets

__all__ = ["BASE_ROW", "LoraModel", "check_adapter_name", "get_lora_model"]

class LoraModel(nn.Module):
    """A model with LoRA adapters. Calls and attributes it does not define go to the wrapped model,
    so ``generate``, ``config``, ``save_pretrained`` of the base etc. work as before."""

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self._last_rows: tuple | None = None  # ((adapter_names, device), RowAdapters) of the last mixed batch
        self._journal: Journal | None = None
        self.training = model.training
        self._original_flags = [(p, p.requires_grad) for p in model.parameters()]  # given back by unload()
        for param, _ in self._original_flags:
            param.requires_grad_(False)
        if config is None:
            return
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self.restore_original_flags()  # a failed wrap leaves the model exactly as it was
            raise

    def restore_original_flags(self) -> None:
        """Give the wrapped model's parameters back the ``requires_grad`` they had before wrapping."""
        for param, flag in self._original_flags:
            param.requires_grad_(flag)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Inside the block, any exception undoes every change made to the model (module types, tensors
        bit-exactly, ``requires_grad`` flags, adapters) before it propagates. Nested blocks join the outer one."""
        if self._journal is not None:
            yield
            return
        self._journal = Journal(self.model, self._wrappers())
        config, active = dict(self.peft_config), list(self.active_adapters)
        try:
            yield
        except BaseException:
            self._journal.rollback()
            self.peft_config.clear()
            self.peft_config.update(config)
            self.active_adapters = active
            self._last_rows = None
            raise
        finally:
            self._journal = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- modules ----------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(path, layer) for every LoRA layer, paths relative to the wrapped model."""
        for path, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield path, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """(path, wrapper) for every module trained in full (``modules_to_save``), paths relative to the wrapped model.

        Yields:
            ``(path, module)`` for every `ModulesToSave` in the wrapped model.
        """
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield path, module

    def _wrappers(self) -> Iterator[LoraLayer | ModulesToSave]:
        yield from (m for _, m in self.lora_layers())
        yield from (m for _, m in self.saved_modules())

    def _replace(self, path: str, new: nn.Module) -> None:
        """Put `new` at `path`, in the train/eval mode of the module it replaces."""
        old = self.model.get_submodule(path)
        new.train(old.training)
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        if self._journal is not None:
            self._journal.replaced.append((parent, child, old))
        setattr(parent, child, new)

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
        check_adapter_name(name)
        if name in self.peft_config:
            raise AdapterNameError(f"an adapter named {name!r} exists already; pick another name or delete it first.")
        if not isinstance(config, LoraConfig):
            raise LoraConfigError(f"config is a {type(config).__name__}: pass a lorakit.LoraConfig.")
        plan = plan_targets(self.model, config)
        if initialize and moves_base(config.init_lora_weights):
            self._refuse_shared_weights(plan)
            _refuse_rank_above_width(plan)
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
        for path in plan.modules_to_save:
            wrapper = self.model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                self._replace(path, wrapper)
            else:
                self._journal.added.append((wrapper, name))
            wrapper.add_adapter(name)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make these adapters active (their outputs add up); the others are frozen and unused.

        Args:
            names: one adapter name or a sequence of them.

        Raises:
            AdapterNameError: a name is not an adapter of this model.
        """
        names = [names] if isinstance(names, str) else list(names)
        self.check_names(names)
        for wrapper in self._wrappers():
            wrapper.active_adapters = [n for n in names if n in wrapper.adapter_names]
        self.active_adapters = names
        self._set_trainable()

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter everywhere; modules left with no adapter get their original back.

        If it was active, the remaining active adapters (or else the first adapter left) become active.

        Args:
            name: the adapter to remove.

        Raises:
            AdapterNameError: the model has no adapter `name`.
            LoraError: the adapter is merged (call `unmerge_adapter` first).
        """
        self.check_names([name])
        if any(name in layer.merged_adapters for _, layer in self.lora_layers()):
            raise LoraError(f"adapter {name!r} is merged; call unmerge_adapter() before deleting it.")
        for path, wrapper in list(self.lora_layers()) + list(self.saved_modules()):
            if name in wrapper.adapter_names:
                wrapper.delete_adapter(name)
            if not wrapper.adapter_names:
                self._replace(path, wrapper.base_layer)
        del self.peft_config[name]
        remaining = [n for n in self.active_adapters if n != name]
        self.active_adapters = []
        if remaining or self.peft_config:
            self.set_adapter(remaining or [next(iter(self.peft_config))])

    def check_names(self, names: Sequence[str]) -> None:
        """Raise `AdapterNameError` for the first name that is not an adapter of this model.

        Args:
            names: adapter names to check.

        Raises:
            AdapterNameError: a name is not an adapter of this model.
        """
        for name in names:
            if name not in self.peft_config:
                raise AdapterNameError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}.")

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

    # -- switching adapters off and on ------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block; adapters (and merges) come back after, also on errors."""
        merged = {path: list(layer.merged_adapters) for path, layer in self.lora_layers()}
        self.unmerge_adapter()
        for wrapper in self._wrappers():
            wrapper.disabled = True
        try:
            yield
        finally:
            for wrapper in self._wrappers():
                wrapper.disabled = False
            for path, layer in self.lora_layers():
                layer.merge(merged[path])

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, in float32.

        Args:
            adapter_names: the adapters to merge, or None for the active ones.

        Raises:
            AdapterNameError: a name is not an adapter of this model.
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self.check_names(names)
        for _, layer in self.lora_layers():
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        """Restore the base weights as they were before `merge_adapter`."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """The plain model with the active adapters folded in (and the active modules_to_save copies)."""
        self.merge_adapter()
        return self._unwrap(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """The plain model with every update dropped: original weights (also under PiSSA/MiLoRA
        adapters, whose residual is undone) and original saved modules."""
        self.unmerge_adapter()
        for _, layer in self.lora_layers():
            for name in list(layer.initial_factors):
                layer.restore_base(name)
        return self._unwrap(keep_trained_copies=False)

    def _unwrap(self, keep_trained_copies: bool) -> nn.Module:
        for path, layer in list(self.lora_layers()):
            self._replace(path, layer.base_layer)
        for path, wrapper in list(self.saved_modules()):
            self._replace(path, wrapper.current() if keep_trained_copies else wrapper.base_layer)
        self.peft_config.clear()
        self.active_adapters = []
        self.restore_original_flags()
        return self.model

    def train(self, mode: bool = True) -> LoraModel:
        """With ``merge_weights=True`` (loralib behaviour): eval() merges the active adapters, train() unmerges.

        Args:
            mode: True for training mode, False for evaluation mode.

        Returns:
            This model.
        """
        super().train(mode)
        if any(self.peft_config[n].merge_weights for n in self.active_adapters):
            if mode:
                self.unmerge_adapter()
            else:
                self.merge_adapter()
        return self

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Call the wrapped model. ``adapter_names`` (one name or ``"__base__"`` per batch row) runs each
        row with its own adapter in one batched pass.

        Args:
            *args: positional inputs of the wrapped model.
            adapter_names: one adapter name (or ``"__base__"``) per batch row, or None for the active adapters.
            **kwargs: keyword inputs of the wrapped model.

        Returns:
            The wrapped model's output.

        Raises:
            AdapterNameError: `adapter_names` holds a name that is not an adapter of this model.
            MixedBatchError: with `adapter_names`, an adapter is merged, or the batch cannot be split into one row
                per name.
        """
        with self._rows(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Call the wrapped model's ``generate``; ``adapter_names`` routes rows as in `forward`.

        Args:
            *args: positional arguments of the wrapped model's ``generate``.
            adapter_names: one adapter name (or ``"__base__"``) per batch row, or None for the active adapters.
            **kwargs: keyword arguments of the wrapped model's ``generate`` (``max_new_tokens``...).

        Returns:
            What the wrapped model's ``generate`` returns (e.g. token ids (batch, length)).

        Raises:
            AdapterNameError: `adapter_names` holds a name that is not an adapter of this model.
            MixedBatchError: with `adapter_names`, an adapter is merged, or the batch cannot be split into one row
                per name.
        """
        with self._rows(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unique = [n for n in dict.fromkeys(adapter_names) if n != BASE_ROW]
        self.check_names(unique)
        if any(layer.merged_adapters for _, layer in self.lora_layers()):
            raise MixedBatchError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        device = next(self.model.parameters()).device
        layout = (tuple(adapter_names), device)
        if self._last_rows is None or self._last_rows[0] != layout:  # the same layout reuses its RowAdapters (layer caches)
            slot = {name: i for i, name in enumerate(unique)} | {BASE_ROW: len(unique)}
            self._last_rows = (layout, RowAdapters(tuple(unique), torch.tensor([slot[n] for n in adapter_names], device=device)))
        rows = self._last_rows[1]
        for wrapper in self._wrappers():  # every wrapper kind routes rows: LoRA layers and saved modules
            wrapper.route_rows(rows)
        try:
            yield
        finally:
            for wrapper in self._wrappers():
                wrapper.route_rows(None)

    # -- parameters -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; the base's frozen copies inside wrappers count once."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts and the trainable share (as PEFT does)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- files (PEFT format) ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write adapters in PEFT's format. One named adapter goes to `save_directory` itself; with no
        name, every adapter is written as PEFT does ("default" at the top, others in sub-folders).

        Args:
            save_directory: the folder; it is replaced whole.
            adapter_name: the adapter to write, or None for every adapter.

        Raises:
            AdapterNameError: `adapter_name` is not an adapter of this model, or the model has no adapter.
            AdapterSaveError: `save_directory` is a file, or a folder holding other things than adapters.
        """
        if adapter_name is not None:
            write_adapters(save_directory, {"": saved_adapter(self, adapter_name)})
            return
        if not self.peft_config:
            raise AdapterNameError("this model has no adapter to save; add one first.")
        write_adapters(save_directory, {"" if name == "default" else name: saved_adapter(self, name) for name in self.peft_config})

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter from a PEFT-format directory; on any error the model is left unchanged.

        Args:
            directory: a PEFT-format adapter folder (written by lorakit or PEFT).
            adapter_name: the name the adapter gets in this model.
            is_trainable: False freezes the loaded adapter and puts the model in eval mode.

        Raises:
            AdapterNameError: `adapter_name` is not a valid adapter name.
            AdapterLoadError: the model has an adapter `adapter_name` already, or the files are missing, corrupt or
                do not fit the model.
        """
        load_adapter(self, directory, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> LoraModel:
        """Wrap `model` and load the adapter saved in `directory` (by lorakit or PEFT)."""
        check_adapter_name(adapter_name)
        adapter = read_adapter(directory)
        check_adapter_fits(model, adapter, directory)  # before touching the model
        lora_model = cls(model)
        try:
            apply_adapter(lora_model, adapter_name, adapter.config, adapter.tensors, is_trainable, adapter.initial)
        except BaseException:
            lora_model.restore_original_flags()
            raise
        return lora_model


def _refuse_rank_above_width(plan: AdapterPlan) -> None:
    """An SVD init takes r singular components: there are only min(out, in)."""
    for target in plan.targets:
        if target.rank > min(target.out_features, target.in_features):
            raise LoraConfigError(
                f"rank {target.rank} for {target.path!r} exceeds its {min(target.out_features, target.in_features)} singular "
                "values (min(out, in)); PiSSA/MiLoRA need r <= min(out, in). Lower r or use rank_pattern for this module."
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
