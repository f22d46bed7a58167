"""Where a backbone keeps what LST needs (blocks, final norm, head, rotary embedding), the side network's
config at width d/r, and each block parameter's role for structural pruning.

Two kinds of backbone: causal LMs (Llama family, GPT-2), whose output is the backbone's frozen head on
``h_L + up(s_K)``, and BERT-style sequence classifiers (BERT, and encoders with BERT's layer names such as
all-MiniLM-L6-v2), whose class logits come from a head on the side output alone (the backbone's own head is a
fresh one for a new task, so nothing of it is kept).

A role names the axis a parameter's dimension lives on: ``hidden`` (the residual stream), ``ffn`` (the
feed-forward inner width), ``q`` / ``kv`` (heads x head_dim of queries / of keys and values) and ``qkv``
(GPT-2's fused q|k|v output). Weights are stored (out, in) for Linear and (in, out) for GPT-2's Conv1D.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ...core.errors import LoraConfigError, UnsupportedModelError

__all__ = ["Architecture", "describe"]

# parameter name inside a block -> (role of the input axis, role of the output axis); None: a 1-D tensor's only axis
_LLAMA_ROLES = {
    "self_attn.q_proj.weight": ("hidden", "q"), "self_attn.k_proj.weight": ("hidden", "kv"),
    "self_attn.v_proj.weight": ("hidden", "kv"), "self_attn.o_proj.weight": ("q", "hidden"),
    "mlp.gate_proj.weight": ("hidden", "ffn"), "mlp.up_proj.weight": ("hidden", "ffn"), "mlp.down_proj.weight": ("ffn", "hidden"),
    "input_layernorm.weight": (None, "hidden"), "post_attention_layernorm.weight": (None, "hidden"),
}
_GPT2_ROLES = {
    "attn.c_attn.weight": ("hidden", "qkv"), "attn.c_attn.bias": (None, "qkv"), "attn.c_proj.weight": ("q", "hidden"),
    "attn.c_proj.bias": (None, "hidden"), "mlp.c_fc.weight": ("hidden", "ffn"), "mlp.c_fc.bias": (None, "ffn"),
    "mlp.c_proj.weight": ("ffn", "hidden"), "mlp.c_proj.bias": (None, "hidden"),
    "ln_1.weight": (None, "hidden"), "ln_1.bias": (None, "hidden"), "ln_2.weight": (None, "hidden"), "ln_2.bias": (None, "hidden"),
}
_BERT_ROLES = {
    **{f"attention.self.{name}.{kind}": roles for name in ("query", "key", "value")
       for kind, roles in (("weight", ("hidden", "q")), ("bias", (None, "q")))},
    "attention.output.dense.weight": ("q", "hidden"), "attention.output.dense.bias": (None, "hidden"),
    "attention.output.LayerNorm.weight": (None, "hidden"), "attention.output.LayerNorm.bias": (None, "hidden"),
    "intermediate.dense.weight": ("hidden", "ffn"), "intermediate.dense.bias": (None, "ffn"),
    "output.dense.weight": ("ffn", "hidden"), "output.dense.bias": (None, "hidden"),
    "output.LayerNorm.weight": (None, "hidden"), "output.LayerNorm.bias": (None, "hidden"),
}


@dataclass
class Architecture:
    """A backbone as LST sees it.

    Attributes:
        body: the module that embeds and runs the blocks (``model.model`` / ``model.transformer`` / ``model.bert``).
        blocks: the transformer blocks, in order.
        final_norm: the backbone's final norm (frozen, applied to the combined output); None for post-norm encoders.
        head: the output head (frozen) of a causal LM; None for a classifier (the side network has its own head).
        rotary: the backbone's rotary embedding module, or None (absolute positions, added before block 0).
        side_config: the model config at the side network's width.
        dims: ``hidden``, ``ffn``, ``head_dim``, ``heads``, ``kv_heads`` of the backbone.
        roles: block parameter name -> (input role, output role).
        stored_in_out: weights are stored (in, out) (GPT-2's Conv1D).
        num_labels: classes of a sequence classifier; None for a causal LM.
    """

    body: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None
    head: nn.Module | None
    rotary: nn.Module | None
    side_config: object
    dims: dict[str, int]
    roles: dict[str, tuple[str | None, str]]
    stored_in_out: bool
    num_labels: int | None = None

    @property
    def is_classifier(self) -> bool:
        """Whether the backbone is a sequence classifier (class logits from the side network's own head)."""
        return self.num_labels is not None


def _divide(value: int, factor: int, name: str) -> int:
    if value % factor:
        raise LoraConfigError(f"reduction_factor={factor} does not divide the backbone's {name} ({value}); pick a divisor of it.")
    return value // factor


def describe(model: nn.Module, reduction_factor: int) -> Architecture:
    """The `Architecture` of `model` with a side network 1/`reduction_factor` as wide.

    Args:
        model: a Llama-family (``model.model.layers``) or GPT-2 (``model.transformer.h``) causal LM, or a
            BERT-style sequence classifier (``model.<base>.encoder.layer`` with BERT's parameter names, e.g.
            ``BertForSequenceClassification``).
        reduction_factor: r.

    Returns:
        The architecture description.

    Raises:
        UnsupportedModelError: the model is none of these.
        LoraConfigError: r does not divide a width (for rotary models: the per-head width / 2).
    """
    config, r = model.config, reduction_factor
    if hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model.model, "rotary_emb"):
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        dims = {"hidden": config.hidden_size, "ffn": config.intermediate_size, "head_dim": head_dim, "heads": heads, "kv_heads": kv_heads}
        _divide(head_dim, 2 * r, "per-head width / 2 (rotary pairs)")
        side = copy.deepcopy(config)
        side.hidden_size, side.intermediate_size = _divide(dims["hidden"], r, "hidden size"), _divide(dims["ffn"], r, "intermediate size")
        side.head_dim = head_dim // r
        return Architecture(model.model, model.model.layers, model.model.norm, model.lm_head, model.model.rotary_emb, side, dims,
                            _LLAMA_ROLES, stored_in_out=False)
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        hidden, heads = config.n_embd, config.n_head
        dims = {"hidden": hidden, "ffn": config.n_inner or 4 * hidden, "head_dim": hidden // heads, "heads": heads, "kv_heads": heads}
        side = copy.deepcopy(config)
        side.n_embd, side.n_inner = _divide(hidden, r * heads, "hidden size / heads") * heads, _divide(dims["ffn"], r, "inner size")
        return Architecture(model.transformer, model.transformer.h, model.transformer.ln_f, model.lm_head, None, side, dims,
                            _GPT2_ROLES, stored_in_out=True)
    if _is_bert_classifier(model):
        hidden, heads = config.hidden_size, config.num_attention_heads
        dims = {"hidden": hidden, "ffn": config.intermediate_size, "head_dim": hidden // heads, "heads": heads, "kv_heads": heads}
        side = copy.deepcopy(config)
        side.hidden_size = _divide(hidden, r * heads, "hidden size / heads") * heads
        side.intermediate_size = _divide(dims["ffn"], r, "intermediate size")
        body = model.base_model
        return Architecture(body, body.encoder.layer, None, None, None, side, dims, _BERT_ROLES, stored_in_out=False,
                            num_labels=config.num_labels)
    raise UnsupportedModelError(
        f"LST supports Llama-family and GPT-2 causal LMs and BERT-style sequence classifiers, not {type(model).__name__}; "
        "use LoRA, IA3 or a prompt method."
    )


def _is_bert_classifier(model: nn.Module) -> bool:
    """A sequence classifier whose encoder layers have BERT's parameter names."""
    body = getattr(model, "base_model", None)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if body is model or not isinstance(layers, nn.ModuleList) or not len(layers):
        return False
    return type(model).__name__.endswith("ForSequenceClassification") and set(_BERT_ROLES) <= dict(layers[0].named_parameters()).keys()
