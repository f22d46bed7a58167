"""`LSTModel`: a frozen causal LM and a trainable ladder side network beside it (Sung, Cho & Bansal 2022).

The backbone runs under ``torch.no_grad()`` and only its block outputs are kept (read by forward hooks);
the side network then runs on them, so backpropagation never enters the backbone and none of its
activations are stored for backward. Only the side network, its ladders, gates and up-projection train.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...core.errors import AdapterLoadError, LoraConfigError, LoraError
from ...core.examples import IGNORE_INDEX
from ...core.peft_format import check_tensors
from .architectures import Architecture, describe
from .config import LSTConfig
from .files import read_lst, write_lst
from .pruning import kept_indices, magnitude, prune_into

__all__ = ["LSTModel", "SideNetwork"]

_BACKBONE_ONLY = ("cache", "past_key_values", "layer_past", "use_cache", "position_embeddings", "cache_position")


def _norm_like(norm: nn.Module, width: int) -> nn.Module:
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    return type(norm)(width, eps=eps)


class SideNetwork(nn.Module):
    """The ladder side network (LST, Sec. 3.1): an input down-projection of the embeddings, one ladder
    (down-projection d -> d/r) and gate per side block, the side blocks, a final norm and the up-projection.

    Args:
        arch: the backbone's `Architecture`.
        config: the `LSTConfig`.
        layers: backbone block indices that feed the side blocks.
    """

    def __init__(self, arch: Architecture, config: LSTConfig, layers: list[int]) -> None:
        super().__init__()
        hidden, width = arch.dims["hidden"], arch.dims["hidden"] // config.reduction_factor
        self.layers = layers
        self.temperature = config.gate_temperature
        self.embed_down = nn.Linear(hidden, width)
        self.ladders = nn.ModuleList(nn.Linear(hidden, width) for _ in layers)
        self.gates = nn.Parameter(torch.full((len(layers),), float(config.gate_init)))  # α; μ = sigmoid(α / T)
        self.blocks = nn.ModuleList(type(arch.blocks[i])(arch.side_config, layer_idx=k) for k, i in enumerate(layers))
        self.norm = _norm_like(arch.final_norm, width)
        self.rotary = type(arch.rotary)(config=arch.side_config) if arch.rotary is not None else None
        self.up = nn.Linear(width, hidden)
        for linear in [self.embed_down, *self.ladders]:
            nn.init.normal_(linear.weight, std=0.01)  # the official code's init
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.up.weight)  # the model starts as the backbone (as LoRA's B = 0)
        nn.init.zeros_(self.up.bias)

    def gate_values(self) -> Tensor:
        """μ of every side block, (blocks,)."""
        return torch.sigmoid(self.gates / self.temperature)

    def forward(self, embeddings: Tensor, states: dict[int, Tensor], block_kwargs: dict[str, Any]) -> Tensor:
        """The side stream's contribution to the backbone's last hidden state.

        Args:
            embeddings: (batch, seq, d) the input of the backbone's first block.
            states: backbone block index -> its output (batch, seq, d).
            block_kwargs: the keyword arguments the backbone's blocks got (masks, positions).

        Returns:
            (batch, seq, d): ``up(norm(s_K))``.
        """
        kwargs = {k: v for k, v in block_kwargs.items() if k not in _BACKBONE_ONLY}
        side = self.embed_down(embeddings)  # (batch, seq, d/r)
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(side, kwargs["position_ids"])
        for k, (index, mu) in enumerate(zip(self.layers, self.gate_values())):
            z = mu * self.ladders[k](states[index]) + (1 - mu) * side  # (batch, seq, d/r)
            out = self.blocks[k](z, **kwargs)
            side = out[0] if isinstance(out, tuple) else out
        return self.up(self.norm(side))  # (batch, seq, d)


class LSTModel(nn.Module):
    """A frozen causal LM with a ladder side network; the output is ``head(final_norm(h_L + up(norm(s_K))))``.

    Args:
        model: a Llama-family or GPT-2 causal LM; its parameters are frozen.
        config: the `LSTConfig`.
        fisher_batches: for ``init="fisher"``: batches (dicts with ``input_ids``, ``labels``, optional
            ``attention_mask``) whose loss gradients rank the backbone's weights.

    Raises:
        UnsupportedModelError: the model is not a supported causal LM.
        LoraConfigError: the reduction factor does not divide the widths, ``side_layers`` names a missing block, or
            ``init="fisher"`` comes without batches.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
        ...                                     num_hidden_layers=2, num_attention_heads=4))
        >>> LSTModel(base, LSTConfig(reduction_factor=4))(input_ids=torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 64])
    """

    returns_cache = False  # the side network keeps no key/value cache: evaluation scores options in full passes

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
    def _run_backbone(self, **inputs) -> tuple[Tensor, dict[int, Tensor], dict[str, Any]]:
        """The frozen backbone under no_grad: (block 0's input, block outputs by index, block keyword arguments)."""
        wanted = set(self.side.layers) | {len(self.arch.blocks) - 1}
        captured: dict[str, Any] = {}
        states: dict[int, Tensor] = {}

        def before_first(module, args, kwargs):
            captured["embeddings"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = dict(kwargs)

        def after(index):
            def hook(module, args, output):
                states[index] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [self.arch.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
        handles += [self.arch.blocks[i].register_forward_hook(after(i)) for i in sorted(wanted)]
        try:
            with torch.no_grad():
                self.arch.body(**{k: v for k, v in inputs.items() if v is not None}, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return captured["embeddings"], states, captured["kwargs"]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits (and the causal-LM loss with `labels`) of the backbone with the side network's correction.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, seq) 1 for real tokens.
            position_ids: (batch, seq) positions, or None.
            inputs_embeds: (batch, seq, d) instead of `input_ids`.
            labels: (batch, seq) next-token targets (-100: not in the loss), or None.
            logits_to_keep: compute logits for the last k positions only (0: all).
            **kwargs: ignored backbone options (``use_cache`` is always off in training).

        Returns:
            A `CausalLMOutputWithPast` with ``logits`` (batch, seq or k, vocab) and ``loss``.
        """
        embeddings, states, block_kwargs = self._run_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                                              position_ids=position_ids, inputs_embeds=inputs_embeds)
        last = states[len(self.arch.blocks) - 1]
        hidden = last + self.side(embeddings, states, block_kwargs)  # (batch, seq, d)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.arch.head(self.arch.final_norm(hidden))  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

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


def fisher_scores(model: nn.Module, arch: Architecture, batches: list[dict]) -> dict[int, dict[str, Tensor]]:
    """Fisher information of every block weight: squared gradients of the loss, summed over `batches` (LST's
    ranking for pruning, after Michel et al. / the official code's ``fisher.py``).

    Args:
        model: the backbone (its parameters' requires_grad are restored afterwards).
        arch: its `Architecture`.
        batches: dicts with ``input_ids``, ``labels`` and optionally ``attention_mask``.

    Returns:
        Block index -> parameter name -> summed squared gradient (same shape as the parameter).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    totals = {i: {name: torch.zeros_like(p, dtype=torch.float32) for name, p in block.named_parameters()} for i, block in enumerate(arch.blocks)}
    try:
        model.requires_grad_(False)
        for block in arch.blocks:
            block.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for i, block in enumerate(arch.blocks):
                for name, p in block.named_parameters():
                    if p.grad is not None:
                        totals[i][name] += p.grad.float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    return totals
