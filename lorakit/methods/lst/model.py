"""`LSTModel`: a frozen backbone and a trainable ladder side network beside it (Sung, Cho & Bansal 2022).

The backbone runs under ``torch.no_grad()`` and only its block outputs are kept (read by forward hooks);
the side network then runs on them, so backpropagation never enters the backbone and none of its
activations are stored for backward. Only the side network (ladders, gates, blocks, output) trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from ...core.errors import AdapterLoadError, LoraConfigError, LoraError, UnsupportedModelError
from ...core.examples import IGNORE_INDEX
from ...core.peft_format import check_tensors
from .architectures import describe
from .config import LSTConfig
from .files import read_lst, write_lst
from .pruning import fisher_scores, kept_indices, magnitude, prune_into
from .side import SideNetwork, block_keywords

__all__ = ["LSTModel"]


class LSTModel(nn.Module):
    """A frozen backbone with a ladder side network.

    For a causal LM the output is ``head(final_norm(h_L + up(norm(s_K))))`` with the backbone's frozen final norm
    and head; for a BERT-style sequence classifier the class logits come from the side network's own head on the
    first token's side state (LST, Sec. 3.1).

    Args:
        model: a Llama-family or GPT-2 causal LM, or a BERT-style sequence classifier; its parameters are frozen.
        config: the `LSTConfig`.
        fisher_batches: for ``init="fisher"``: batches (dicts with ``input_ids``, ``labels``, optional
            ``attention_mask``) whose loss gradients rank the backbone's weights.

    Raises:
        UnsupportedModelError: the model is none of the supported kinds.
        LoraConfigError: the reduction factor does not divide the widths, ``side_layers`` names a missing block, or
            ``init="fisher"`` comes without batches.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
        ...                                     num_hidden_layers=2, num_attention_heads=4))
        >>> LSTModel(base, LSTConfig(reduction_factor=4))(input_ids=torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 64])
    """

    returns_cache = False  # forward keeps no key/value cache: evaluation scores options in full passes (generate keeps one)

    def __init__(self, model: nn.Module, config: LSTConfig, fisher_batches: list[dict] | None = None) -> None:
        super().__init__()
        arch = describe(model, config.reduction_factor)
        layers = config.side_layers if config.side_layers is not None else list(range(len(arch.blocks)))
        if layers[-1] >= len(arch.blocks):
            raise LoraConfigError(f"side_layers={layers} names block {layers[-1]}; the backbone has {len(arch.blocks)} blocks (0..{len(arch.blocks) - 1}).")
        if config.init == "fisher" and not fisher_batches:
            raise LoraConfigError("init='fisher' ranks weights by their loss gradients: pass fisher_batches (a few tokenised batches).")
        self.model, self.config, self.arch = model, config, arch
        self.peft_config = {"default": config}
        self.side = SideNetwork(arch, config, layers).to(device=model.device)
        if config.init != "random":
            scores = fisher_scores(model, arch, fisher_batches[: config.fisher_batches]) if config.init == "fisher" else None
            self._prune(scores)
        model.requires_grad_(False)
        self.train(model.training)  # the side network starts in the backbone's mode (HF models load in eval mode)

    @torch.no_grad()
    def _prune(self, fisher: dict[int, dict[str, Tensor]] | None) -> None:
        """Side blocks from the backbone's, and ladders that start as the selection of the kept dimensions."""
        r = self.config.reduction_factor
        for k, index in enumerate(self.side.layers):
            block = self.arch.blocks[index]
            scores = (lambda name, _param, index=index: fisher[index][name]) if fisher is not None else magnitude
            kept = kept_indices(block, self.arch, r, scores)
            prune_into(self.side.blocks[k], block, self.arch, kept)
            self.side.ladders[k].weight.zero_()
            self.side.ladders[k].weight[torch.arange(kept["hidden"].numel()), kept["hidden"]] = 1.0
            if k == 0:
                self.side.embed_down.weight.copy_(self.side.ladders[0].weight)

    # -- forward ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reading_backbone(self, captured: dict[str, Any]) -> Iterator[None]:
        """Hooks that keep block 0's input and keyword arguments (``captured["embeddings"]`` / ``["kwargs"]``) and the
        outputs of the blocks the side network reads (``captured["states"]``) while the backbone runs."""
        wanted = set(self.side.layers) | {len(self.arch.blocks) - 1}
        captured["states"] = {}

        def before_first(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured["embeddings"], captured["kwargs"] = hidden, block_keywords(module, args, kwargs)

        def after(index):
            def hook(module, args, output):
                captured["states"][index] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [self.arch.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
        handles += [self.arch.blocks[i].register_forward_hook(after(i)) for i in sorted(wanted)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _run_backbone(self, **inputs) -> dict[str, Any]:
        """The frozen backbone's body under no_grad: block 0's input, the block outputs and the blocks' keywords."""
        captured: dict[str, Any] = {}
        with self._reading_backbone(captured), torch.no_grad():
            self.arch.body(**{k: v for k, v in inputs.items() if v is not None}, use_cache=False)
        return captured

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, logits_to_keep: int = 0,
                token_type_ids: Tensor | None = None, **kwargs) -> CausalLMOutputWithPast | SequenceClassifierOutput:
        """Logits (and the loss with `labels`) of the backbone with the side network.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, seq) 1 for real tokens.
            position_ids: (batch, seq) positions, or None.
            inputs_embeds: (batch, seq, d) instead of `input_ids`.
            labels: causal LM: (batch, seq) next-token targets (-100: not in the loss); classifier: (batch,) classes.
            logits_to_keep: causal LM: compute logits for the last k positions only (0: all).
            token_type_ids: (batch, seq) segment ids of an encoder, or None.
            **kwargs: ignored backbone options (``use_cache`` is always off here; `generate` keeps a cache).

        Returns:
            Causal LM: a `CausalLMOutputWithPast` with ``logits`` (batch, seq or k, vocab); classifier: a
            `SequenceClassifierOutput` with ``logits`` (batch, classes); each with ``loss`` when `labels` are given.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "inputs_embeds": inputs_embeds}
        if self.arch.is_classifier:
            captured = self._run_backbone(**inputs, token_type_ids=token_type_ids)
            logits = self.side(captured["embeddings"], captured["states"], captured["kwargs"])  # (batch, classes)
            loss = None if labels is None else F.cross_entropy(logits.float(), labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        captured = self._run_backbone(**inputs)
        last = captured["states"][len(self.arch.blocks) - 1]
        hidden = last + self.side(captured["embeddings"], captured["states"], captured["kwargs"])  # (batch, seq, d)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.arch.head(self.arch.final_norm(hidden))  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, *args, **kwargs) -> Tensor:
        """The backbone's own ``generate`` with the side network beside it: the side network keeps its own key/value
        cache in step with the backbone's, and its output is added to the backbone's last hidden state before the
        final norm at every step, so each new token comes from the same logits `forward` gives.

        Args:
            *args: passed to the backbone's ``generate`` (``input_ids`` first).
            **kwargs: passed to the backbone's ``generate`` (``attention_mask``, ``max_new_tokens``, sampling options, ...).

        Returns:
            (batch, seq + new) token ids, as the backbone's ``generate`` returns them.

        Raises:
            UnsupportedModelError: the backbone is a classifier, or beam search is asked for (it reorders the
                backbone's cache, which the side network's cache would not follow).
        """
        if self.arch.is_classifier:
            raise UnsupportedModelError(f"{type(self.model).__name__} is a sequence classifier; it does not generate text.")
        if kwargs.get("num_beams", 1) > 1 or getattr(kwargs.get("generation_config"), "num_beams", 1) > 1:
            raise UnsupportedModelError("LST generates with greedy decoding or sampling; beam search (num_beams > 1) is not supported.")
        captured: dict[str, Any] = {}
        cache = DynamicCache()

        def add_side(module, args):
            side = self.side(captured["embeddings"], captured["states"], captured["kwargs"], cache)  # (batch, new, d)
            return (args[0] + side.to(args[0].dtype), *args[1:])

        handle = self.arch.final_norm.register_forward_pre_hook(add_side)
        try:
            with self._reading_backbone(captured):
                return self.model.generate(*args, **kwargs)
        finally:
            handle.remove()

    # -- files --------------------------------------------------------------------------------------
    def training_state(self, name: str = "default") -> dict[str, Tensor]:
        """Everything that trains (the side network), by name.

        Args:
            name: ignored (an LST model has one side network); kept for the trainer's interface.

        Returns:
            ``side.<name>`` -> live parameter.
        """
        return {f"side.{key}": value for key, value in self.side.named_parameters()}

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write the side network in lorakit's LST format (`lorakit.methods.lst.files`), atomically.

        Args:
            save_directory: the folder; it is replaced whole.
            adapter_name: ignored (one side network).

        Raises:
            AdapterSaveError: `save_directory` is a file, or a folder holding other things.
        """
        config = self.config
        if config.base_model_name_or_path is None:
            source = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            config = dataclasses.replace(config, base_model_name_or_path=source or None)
        tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in self.side.state_dict().items()}
        write_lst(save_directory, config, {f"side.{key}": value for key, value in tensors.items()})

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False) -> LSTModel:
        """Build the side network saved in `directory` beside `model`.

        Args:
            model: the backbone it was trained on.
            directory: a folder written by `save_pretrained`.
            is_trainable: False freezes the side network and puts the model in eval mode.

        Returns:
            The `LSTModel`.

        Raises:
            AdapterLoadError: the files are missing, corrupt, or do not fit `model`.
        """
        config, tensors = read_lst(directory)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            wrapped = cls(model, dataclasses.replace(config, init="random"))
        except LoraError as err:
            raise AdapterLoadError(f"the LST side network in {directory} does not fit this model: {err}") from None
        expected = {f"side.{key}": tuple(value.shape) for key, value in wrapped.side.state_dict().items()}
        try:
            check_tensors(tensors, expected, directory)
        except AdapterLoadError:
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        wrapped.side.load_state_dict({key.removeprefix("side."): value for key, value in tensors.items()})
        wrapped.config = wrapped.peft_config["default"] = config
        if not is_trainable:
            wrapped.side.requires_grad_(False)
            wrapped.eval()
        return wrapped

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts.

        Returns:
            ``(trainable, total)``.
        """
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

