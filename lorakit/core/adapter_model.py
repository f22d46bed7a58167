"""`AdapterModel`: what every adapter method's model shares, whatever its adapters are.

A method (LoRA, IA3, the prompt methods) subclasses it and says how an adapter is added to the wrapped
model (`add_adapter`), which tensors it is under PEFT's keys (`adapter_parameters`) and how a saved one
is put back (`_check_fits`, `_apply_saved`). The rest is here once: the adapter registry, active adapters and
their ``requires_grad`` flags, transactions that undo a failed change exactly, mixed-batch routing over
the module-tree wrappers (`AdapterWrapper`), merge/unmerge for wrappers that can merge, disabling,
parameter counts, and PEFT-format save/load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .adapter_files import AdapterFiles
from .errors import AdapterNameError, LoraConfigError, LoraError, MixedBatchError
from .journal import Journal
from .names import BASE_ROW, check_adapter_name
from .routing import AdapterWrapper, RowAdapters
from .saved_modules import ModulesToSave

__all__ = ["AdapterModel"]


class AdapterModel(AdapterFiles, nn.Module):
    """A model with named adapters of one method. Calls and attributes it does not define go to the wrapped
    model, so ``generate``, ``config``, ``save_pretrained`` of the base etc. work as before.

    Subclasses set `config_types` (PEFT's ``peft_type`` -> config class) and implement `add_adapter`,
    `adapter_parameters`, `_set_trainable`, `_check_fits` and `_apply_saved`.

    Args:
        model: the model to adapt; its own parameters are frozen (and given back by ``unload``).
    """

    merge_refusal: ClassVar[str | None] = None  # why this method's adapters cannot be merged, if they cannot

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, Any] = {}
        self.active_adapters: list[str] = []
        self._last_rows: tuple | None = None  # ((adapter_names, device), RowAdapters) of the last mixed batch
        self._journal: Journal | None = None
        self.training = model.training
        self._original_flags = [(p, p.requires_grad) for p in model.parameters()]  # given back by unload()
        for param, _ in self._original_flags:
            param.requires_grad_(False)

    def _add_first(self, adapter_name: str, config: Any) -> None:
        """Add the first adapter; a failure gives the model back exactly as it was, flags included."""
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self.restore_original_flags()
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
        extra = self._journal_extra()
        try:
            yield
        except BaseException:
            self._journal.rollback()
            self.peft_config.clear()
            self.peft_config.update(config)
            self.active_adapters = active
            self._last_rows = None
            self._rollback_extra(extra)
            raise
        finally:
            self._journal = None

    def _journal_extra(self) -> Any:
        """State outside the module tree a subclass must restore on rollback (see `_rollback_extra`)."""
        return None

    def _rollback_extra(self, saved: Any) -> None:
        """Restore what `_journal_extra` returned."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- modules ----------------------------------------------------------------------------------
    def modules_of_type(self, kind: type) -> Iterator[tuple[str, Any]]:
        """(path, module) for every module of class `kind` in the wrapped model, paths relative to it.

        Args:
            kind: a module class, e.g. `ModulesToSave` or a method's layer class.

        Yields:
            ``(path, module)`` in ``named_modules`` order.
        """
        for path, module in self.model.named_modules():
            if isinstance(module, kind):
                yield path, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        """(path, wrapper) for every module trained in full (``modules_to_save``), paths relative to the wrapped model.

        Yields:
            ``(path, module)`` for every `ModulesToSave` in the wrapped model.
        """
        return self.modules_of_type(ModulesToSave)

    def _wrappers(self) -> Iterator[AdapterWrapper]:
        """Every adapter wrapper in the module tree (the method's layers and saved modules)."""
        for _, module in self.model.named_modules():
            if isinstance(module, AdapterWrapper):
                yield module

    def _mergeable(self) -> Iterator[tuple[str, nn.Module]]:
        """(path, wrapper) for every wrapper that can fold adapters into its base (``merge``/``unmerge``)."""
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterWrapper) and hasattr(module, "merged_adapters"):
                yield path, module

    def _replace(self, path: str, new: nn.Module) -> None:
        """Put `new` at `path`, in the train/eval mode of the module it replaces."""
        old = self.model.get_submodule(path)
        new.train(old.training)
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        if self._journal is not None:
            self._journal.replaced.append((parent, child, old))
        setattr(parent, child, new)

    def _add_saved_modules(self, name: str, paths: Sequence[str]) -> None:
        """Give adapter `name` a trainable copy of each module at `paths` (``modules_to_save``)."""
        for path in paths:
            wrapper = self.model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                self._replace(path, wrapper)
            else:
                self._journal.added.append((wrapper, name))
            wrapper.add_adapter(name)

    def _fill(self, live: dict[str, Tensor], tensors: dict[str, Tensor], is_trainable: bool) -> None:
        """Copy checked `tensors` into the `live` ones (cast to their dtypes); freeze them unless `is_trainable`."""
        with torch.no_grad():
            for key, tensor in tensors.items():
                live[key].copy_(tensor.to(live[key].dtype))
        if not is_trainable:
            for tensor in live.values():
                tensor.requires_grad_(False)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: Any) -> None:
        """Add adapter `name` with `config` (the method's own config class).

        Args:
            name: the new adapter's name.
            config: the adapter's config.
        """
        raise NotImplementedError

    def _check_new(self, name: str, config: Any) -> None:
        """Refuse a bad or taken name, or a config of another method, before anything changes."""
        check_adapter_name(name)
        if name in self.peft_config:
            raise AdapterNameError(f"an adapter named {name!r} exists already; pick another name or delete it first.")
        allowed = tuple(self.config_types.values())
        if not isinstance(config, allowed):
            raise LoraConfigError(
                f"config is a {type(config).__name__}; {type(self).__name__} takes {' or '.join(c.__name__ for c in allowed)}. "
                "Use lorakit.get_peft_model(model, config) to pick the model class from the config."
            )

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make these adapters active (their effects combine); the others are frozen and unused.

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

    def _set_trainable(self) -> None:
        """Active adapters train; inactive ones and the base stay frozen."""
        raise NotImplementedError

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
        if any(name in wrapper.merged_adapters for _, wrapper in self._mergeable()):
            raise LoraError(f"adapter {name!r} is merged; call unmerge_adapter() before deleting it.")
        for path, wrapper in [(p, m) for p, m in self.model.named_modules() if isinstance(m, AdapterWrapper)]:
            if name in wrapper.adapter_names:
                wrapper.delete_adapter(name)
            if not wrapper.adapter_names:
                self._replace(path, wrapper.base_layer)
        self._delete_extra(name)
        del self.peft_config[name]
        remaining = [n for n in self.active_adapters if n != name]
        self.active_adapters = []
        if remaining or self.peft_config:
            self.set_adapter(remaining or [next(iter(self.peft_config))])

    def _delete_extra(self, name: str) -> None:
        """Remove what adapter `name` keeps outside the module tree's wrappers (e.g. a prompt encoder)."""

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

    # -- switching adapters off and on, merging ---------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block; adapters (and merges) come back after, also on errors."""
        merged = {path: list(wrapper.merged_adapters) for path, wrapper in self._mergeable()}
        self.unmerge_adapter()
        wrappers = list(self._wrappers())
        for wrapper in wrappers:
            wrapper.disabled = True
        self._set_disabled(True)
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.disabled = False
            self._set_disabled(False)
            for path, wrapper in self._mergeable():
                wrapper.merge(merged[path])

    def _set_disabled(self, disabled: bool) -> None:
        """Switch off (or back on) what the method keeps outside the module tree's wrappers."""

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, in float32.

        Args:
            adapter_names: the adapters to merge, or None for the active ones.

        Raises:
            AdapterNameError: a name is not an adapter of this model.
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self.check_names(names)
        for _, wrapper in self._mergeable():
            wrapper.merge(names)

    def unmerge_adapter(self) -> None:
        """Restore the base weights as they were before `merge_adapter`."""
        for _, wrapper in self._mergeable():
            wrapper.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """The plain model with the active adapters folded in (and the active modules_to_save copies).

        Returns:
            The wrapped model, its wrappers replaced by plain modules holding the merged weights.
        """
        self.merge_adapter()
        return self._unwrap(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """The plain model with every update dropped: original weights and original saved modules.

        Returns:
            The wrapped model, its wrappers replaced by the original modules.
        """
        self.unmerge_adapter()
        return self._unwrap(keep_trained_copies=False)

    def _unwrap(self, keep_trained_copies: bool) -> nn.Module:
        for path, wrapper in [(p, m) for p, m in self.model.named_modules() if isinstance(m, AdapterWrapper)]:
            if isinstance(wrapper, ModulesToSave) and keep_trained_copies:
                self._replace(path, wrapper.current())
            else:
                self._replace(path, wrapper.base_layer)
        for name in list(self.peft_config):
            self._delete_extra(name)
        self.peft_config.clear()
        self.active_adapters = []
        self.restore_original_flags()
        return self.model

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
        if any(wrapper.merged_adapters for _, wrapper in self._mergeable()):
            raise MixedBatchError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first.")
        device = next(self.model.parameters()).device
        layout = (tuple(adapter_names), device)
        if self._last_rows is None or self._last_rows[0] != layout:  # the same layout reuses its RowAdapters (layer caches)
            self._last_rows = (layout, RowAdapters.for_rows(adapter_names, unique, device))
        rows = self._last_rows[1]
        wrappers = list(self._wrappers())
        for wrapper in wrappers:  # every wrapper kind routes rows
            wrapper.route_rows(rows)
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.route_rows(None)

    # -- parameters -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; the base's frozen copies inside wrappers count once.

        Returns:
            ``(trainable, total)`` numbers of parameter elements.
        """
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts and the trainable share (as PEFT does)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
