"""The PEFT-format half of `AdapterModel`: which tensors an adapter is under PEFT's keys, writing adapters
(one folder swap) and loading them back into a model, checked before anything changes.

`AdapterFiles` is a base class of `AdapterModel` only; a method's model implements `adapter_parameters`,
`_check_fits` and `_apply_saved`, and the rest is shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from .errors import AdapterLoadError, AdapterNameError
from .names import check_adapter_name
from .peft_format import SavedAdapter, read_adapter, write_adapters

if TYPE_CHECKING:
    from .adapter_model import AdapterModel

__all__ = ["AdapterFiles"]


class AdapterFiles:
    """Save and load adapters in PEFT's format (mixed into `AdapterModel`, whose registry it reads)."""

    config_types: ClassVar[dict[str, type]] = {}
    peft_config: dict[str, Any]
    model: nn.Module

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, Tensor]]:
        """(saved key, live tensor) pairs of adapter `name`, under PEFT's keys.

        Args:
            name: the adapter's name.
        """
        raise NotImplementedError

    def training_state(self, name: str) -> dict[str, Tensor]:
        """Everything adapter `name` trains, by name: what a checkpoint must hold to resume exactly.

        For most methods this is the saved adapter; methods that train more than they save (a prompt encoder,
        a prefix MLP) add those tensors.

        Args:
            name: the adapter's name.

        Returns:
            Name -> live tensor.
        """
        return dict(self.adapter_parameters(name))

    def saved_adapter(self, name: str) -> SavedAdapter:
        """Adapter `name` as it would be written (tensors copied to the CPU).

        Args:
            name: the adapter's name.

        Returns:
            A `SavedAdapter` with the config (``base_model_name_or_path`` filled in from the model's config when
            unset) and the tensors under PEFT's keys.

        Raises:
            AdapterNameError: the model has no adapter `name`.
        """
        self.check_names([name])
        config = self.peft_config[name]
        if config.base_model_name_or_path is None:
            source = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            config = config.replace(base_model_name_or_path=source or None)
        tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in self.adapter_parameters(name)}
        return SavedAdapter(config, tensors)

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
            write_adapters(save_directory, {"": self.saved_adapter(adapter_name)})
            return
        if not self.peft_config:
            raise AdapterNameError("this model has no adapter to save; add one first.")
        write_adapters(save_directory, {"" if name == "default" else name: self.saved_adapter(name) for name in self.peft_config})

    def _check_fits(self, model: nn.Module, adapter: SavedAdapter, source: Any) -> None:
        """Raise `AdapterLoadError` if `adapter` does not fit `model` (a plain model or ``self.model``); change nothing."""
        raise NotImplementedError

    def _apply_saved(self, name: str, adapter: SavedAdapter, is_trainable: bool) -> None:
        """Add adapter `name` from checked files, as one transaction."""
        raise NotImplementedError

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter from a PEFT-format directory; on any error the model is left unchanged.

        Args:
            directory: a PEFT-format adapter folder (written by lorakit or PEFT).
            adapter_name: the name the adapter gets in this model.
            is_trainable: False freezes the loaded adapter and puts the model in eval mode.

        Raises:
            AdapterNameError: `adapter_name` is not a valid adapter name.
            AdapterLoadError: the model has an adapter `adapter_name` already, or the files are missing, corrupt, of
                another method or do not fit the model.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterLoadError(f"an adapter named {adapter_name!r} is loaded already; pass another adapter_name.")
        adapter = read_adapter(directory, self.config_types)
        self._check_fits(self.model, adapter, directory)
        self._apply_saved(adapter_name, adapter, is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> AdapterModel:
        """Wrap `model` and load the adapter saved in `directory` (by lorakit or PEFT).

        Args:
            model: the base model the adapter was trained on.
            directory: a PEFT-format adapter folder.
            adapter_name: the name the adapter gets.
            is_trainable: False freezes the adapter and puts the model in eval mode.

        Returns:
            The wrapping model, with the adapter loaded and active.

        Raises:
            AdapterNameError: `adapter_name` is not a valid adapter name.
            AdapterLoadError: the files are missing, corrupt, of another method or do not fit `model`.
        """
        check_adapter_name(adapter_name)
        adapter = read_adapter(directory, cls.config_types)
        wrapped = cls(model)
        try:
            wrapped._check_fits(model, adapter, directory)  # before touching the model
            wrapped._apply_saved(adapter_name, adapter, is_trainable)
        except BaseException:
            wrapped.restore_original_flags()
            raise
        return wrapped
