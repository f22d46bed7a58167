"""What the configs of the non-LoRA methods share: PEFT's ``adapter_config.json`` in and out, and copies.

Each method's config is a dataclass deriving from `MethodConfig` with PEFT's field names; it names its
``peft_type`` and validates itself in ``__post_init__`` (with `lorakit.core.validation`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from .errors import LoraConfigError

__all__ = ["MethodConfig"]

# PEFT keys that carry no meaning for lorakit and are accepted whatever their value.
_PEFT_IGNORED = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "revision"}

Config = TypeVar("Config", bound="MethodConfig")


class MethodConfig:
    """Mixin for a method's config dataclass: ``peft_type`` and PEFT-format conversion.

    Subclasses are dataclasses with a ``base_model_name_or_path`` field and set `peft_type`.
    """

    peft_type: ClassVar[str] = ""

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT 0.21 writes for this config.

        Returns:
            Field name -> value, with ``peft_type``, ``inference_mode`` and ``revision``, keys sorted.
        """
        data = dataclasses.asdict(self)
        data.update(peft_type=self.peft_type, inference_mode=True, revision=None)
        return dict(sorted(data.items()))

    @classmethod
    def from_peft_dict(cls: type[Config], data: dict[str, Any]) -> Config:
        """Build a config from a PEFT ``adapter_config.json`` dict.

        Args:
            data: the parsed JSON object.

        Returns:
            The validated config.

        Raises:
            LoraConfigError: the dict is of another ``peft_type``, turns on an option lorakit does not know, or holds
                an invalid value.
        """
        if data.get("peft_type") != cls.peft_type:
            raise LoraConfigError(f"peft_type={data.get('peft_type')!r}: {cls.__name__} reads {cls.peft_type!r} adapters only.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in set(data) - known - _PEFT_IGNORED if data[k] not in (None, False, [], {}))
        if unknown:
            raise LoraConfigError(f"adapter_config.json has {cls.peft_type} options lorakit does not know: {unknown}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self: Config, **changes: Any) -> Config:
        """A copy with some fields changed (``dataclasses.replace``), validated like a new config.

        Args:
            **changes: field name -> new value.

        Returns:
            The new config; this one is left unchanged.

        Raises:
            LoraConfigError: a changed value is invalid.
        """
        return dataclasses.replace(self, **changes)
