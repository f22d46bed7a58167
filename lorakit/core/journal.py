"""What a failing change to a model must undo, recorded as it happens (`LoraModel.transaction`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .layers import LoraLayer

__all__ = ["Journal"]


class Journal:
    """What a failing mutation of a model's modules must undo: parameter flags, replaced modules, base
    weights changed in place (kept as exact copies), adapters added to existing wrappers and their active
    lists. `rollback` restores all of it bit-exactly, newest change first.

    Args:
        model: the module tree being changed (its parameters' flags are recorded).
        wrappers: the adapter wrappers already in it (their active adapters are recorded).
    """

    def __init__(self, model: nn.Module, wrappers: Iterable[nn.Module]) -> None:
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.wrapper_state = [(w, list(w.active_adapters)) for w in wrappers]
        self.replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, previous module)
        self.weights: list[tuple[Tensor, Tensor]] = []  # (parameter, exact copy before the change)
        self.added: list[tuple[nn.Module, str]] = []  # (existing wrapper, adapter name added to it)

    def remember_weight(self, parameter: Tensor) -> None:
        """Keep an exact copy of `parameter` (once) before something changes it in place.

        Args:
            parameter: a base weight about to be rewritten (e.g. by a PiSSA/MiLoRA init).
        """
        if all(parameter is not seen for seen, _ in self.weights):
            self.weights.append((parameter, parameter.detach().clone()))

    def rollback(self) -> None:
        """Undo everything recorded, newest first: weights, added adapters, replaced modules, active adapters, flags."""
        with torch.no_grad():
            for parameter, original in reversed(self.weights):
                parameter.copy_(original)
        for wrapper, name in reversed(self.added):
            if isinstance(wrapper, LoraLayer):
                wrapper.delete_adapter(name, restore_base=False)  # the weights came back above
            elif name in wrapper.adapter_names:
                wrapper.delete_adapter(name)
        for parent, attribute, previous in reversed(self.replaced):
            setattr(parent, attribute, previous)
        for wrapper, active in self.wrapper_state:
            wrapper.active_adapters = active
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)
