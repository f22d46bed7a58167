"""Which kind of model a prompt method wraps, and the model-shape fields of its config (PEFT's rules)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ...core.errors import LoraConfigError
from ...core.targeting import with_classifier_heads
from .config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig

__all__ = ["model_kind", "resolve_shapes", "task_type"]

Kind = Literal["causal", "seq2seq", "encoder"]


def model_kind(model: nn.Module) -> Kind:
    """``"seq2seq"`` for encoder-decoder models, ``"causal"`` for models that generate, else ``"encoder"``.

    Args:
        model: a Hugging Face model.

    Returns:
        The kind.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    can_generate = getattr(model, "can_generate", None)
    return "causal" if callable(can_generate) and can_generate() else "encoder"


_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def task_type(model: nn.Module) -> str:
    """PEFT's ``task_type`` for a model: PEFT picks its model class (and so how virtual tokens are used) by it.

    Args:
        model: a Hugging Face model.

    Returns:
        ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"`` or ``"FEATURE_EXTRACTION"``.
    """
    kind = model_kind(model)
    if kind == "causal":
        return "CAUSAL_LM"
    if kind == "seq2seq":
        return "SEQ_2_SEQ_LM"
    name = type(model).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")


def _first(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def resolve_shapes(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """`config` with ``task_type`` (see `task_type`), ``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules`` and
    ``encoder_hidden_size`` filled from the model as PEFT fills them; for prefix tuning on grouped-query attention,
    heads are the key/value heads and ``token_dim`` is head_dim x key/value heads.

    Args:
        model: the model to wrap.
        config: a prompt method's config.

    Returns:
        The resolved config.

    Raises:
        LoraConfigError: a set field contradicts the model, or the model's config lacks a needed size.
    """
    source = getattr(model, "config", None)
    source = source.get_text_config() if hasattr(source, "get_text_config") else source
    hidden = _first(source, "hidden_size", "n_embd", "d_model")
    layers = _first(source, "num_hidden_layers", "num_layers", "n_layer")
    heads = _first(source, "num_attention_heads", "n_head", "num_heads")
    if None in (hidden, layers, heads):
        raise LoraConfigError(f"{type(model).__name__}'s config gives no hidden size, layer or head count: set token_dim, "
                              "num_layers and num_attention_heads in the config.")
    token_dim = hidden
    kv_heads = _first(source, "num_key_value_heads")
    if isinstance(config, PrefixTuningConfig) and kv_heads is not None:
        head_dim = _first(source, "head_dim") or hidden // heads
        heads, token_dim = kv_heads, head_dim * kv_heads
    embedding_width = model.get_input_embeddings().weight.shape[1]
    if not isinstance(config, PrefixTuningConfig):
        token_dim = embedding_width
    submodules = 2 if getattr(source, "is_encoder_decoder", False) else 1
    filled = {
        "task_type": config.task_type or task_type(model),
        "token_dim": config.token_dim or token_dim,
        "num_layers": config.num_layers or layers,
        "num_attention_heads": config.num_attention_heads or heads,
        "num_transformer_submodules": config.num_transformer_submodules or submodules,
    }
    expected = {"token_dim": token_dim, "num_layers": layers, "num_attention_heads": heads}
    for name, value in expected.items():
        if filled[name] != value and (name != "num_layers" or isinstance(config, PrefixTuningConfig)):
            raise LoraConfigError(f"{name}={filled[name]} does not fit {type(model).__name__}, which needs {value}: "
                                  f"leave {name} unset (null) to take it from the model.")
    if filled["task_type"] == "SEQ_CLS":
        filled["modules_to_save"] = with_classifier_heads(config.modules_to_save)
    if isinstance(config, (PromptEncoderConfig, PrefixTuningConfig)) and config.encoder_hidden_size is None:
        filled["encoder_hidden_size"] = filled["token_dim"]
    return config.replace(**filled)
