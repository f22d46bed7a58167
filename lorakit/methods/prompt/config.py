"""Configs of the prompt methods, with HF PEFT's field names: prompt tuning (``PROMPT_TUNING``), P-tuning
(``P_TUNING``, PEFT's ``PromptEncoderConfig``) and prefix tuning / P-tuning v2 (``PREFIX_TUNING``).

The model-shape fields (``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``)
may be left None: `resolve_shapes` fills them from the model as PEFT does, and the saved file holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...core.method_config import MethodConfig
from ...core.validation import check_range, check_types

__all__ = ["PrefixTuningConfig", "PromptEncoderConfig", "PromptLearningConfig", "PromptTuningConfig"]


@dataclass
class PromptLearningConfig(MethodConfig):
    """Fields every prompt method shares (PEFT's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: how many virtual tokens (or prefix positions) are learned.
        token_dim: the width of a virtual token (the model's hidden size; for prefix tuning on grouped-query
            attention, head_dim x key/value heads). None: from the model.
        num_transformer_submodules: 1, or 2 for encoder-decoder models (encoder and decoder prompts). None: from the model.
        num_attention_heads: attention heads (key/value heads for prefix tuning). None: from the model.
        num_layers: transformer layers. None: from the model.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        task_type: PEFT's task type, kept in the file (e.g. ``"CAUSAL_LM"``).
        base_model_name_or_path: the base model, written into the file.
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        check_range(1 <= self.num_virtual_tokens <= 4096, "num_virtual_tokens", self.num_virtual_tokens, "use an integer from 1 to 4096")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            check_range(value is None or value >= 1, name, value, "use an integer >= 1 or null (taken from the model)")
        check_range(self.num_transformer_submodules in (None, 1, 2), "num_transformer_submodules", self.num_transformer_submodules,
                    "use 1 (decoder-only or encoder), 2 (encoder-decoder) or null")

    @property
    def total_virtual_tokens(self) -> int:
        """Virtual tokens over all submodules: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", Sec. 2):
    ``num_virtual_tokens`` trainable embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (normal(0, 1), as ``nn.Embedding``), ``"TEXT"`` (the embeddings of
            `prompt_tuning_init_text`'s tokens, repeated or cut to length; Sec. 3.2 "class label" / text init) or
            ``"SAMPLE_VOCAB"`` (embeddings of random vocabulary tokens).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: a local tokenizer folder for ``"TEXT"`` when no tokenizer is passed in code.
        tokenizer_kwargs: keyword arguments for loading that tokenizer.
        **fields: see `PromptLearningConfig`.

    Raises:
        LoraConfigError: a field is invalid, or ``"TEXT"`` comes without a text.

    Example:
        >>> PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text="Answer:").peft_type
        'PROMPT_TUNING'
    """

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.prompt_tuning_init != "TEXT" or bool(self.prompt_tuning_init_text), "prompt_tuning_init_text",
                    self.prompt_tuning_init_text, "give the text whose token embeddings start the prompt")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021, "GPT Understands, Too", Sec. 3.2): virtual tokens produced by a prompt encoder
    (an MLP, or a bidirectional LSTM followed by an MLP) from trainable inputs. The encoder exists for training;
    what is saved is its output, the virtual tokens (as PEFT saves them).

    Args:
        encoder_reparameterization_type: ``"MLP"`` (three linear layers) or ``"LSTM"``.
        encoder_hidden_size: the encoder's hidden width. None: ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP always has PEFT's three).
        encoder_dropout: dropout between LSTM layers.
        **fields: see `PromptLearningConfig`.

    Example:
        >>> PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=64).peft_type
        'P_TUNING'
    """

    peft_type = "P_TUNING"

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.encoder_hidden_size is None or self.encoder_hidden_size >= 1, "encoder_hidden_size",
                    self.encoder_hidden_size, "use an integer >= 1 or null (token_dim)")
        check_range(self.encoder_num_layers >= 1, "encoder_num_layers", self.encoder_num_layers, "use an integer >= 1")
        check_range(0 <= self.encoder_dropout < 1, "encoder_dropout", self.encoder_dropout, "use 0 <= p < 1")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021, Sec. 4) and its deep form P-tuning v2 (Liu et al. 2022, Sec. 3.1): trainable
    keys and values prepended at every layer. With ``prefix_projection`` the prefix is an MLP's output
    (Li & Liang's reparameterisation, Sec. 4.3), used in training and folded away on save.

    Args:
        prefix_projection: reparameterise the prefix with ``Linear(token_dim, encoder_hidden_size)`` -> tanh ->
            ``Linear(encoder_hidden_size, num_layers * 2 * token_dim)``.
        encoder_hidden_size: the projection's hidden width. None: ``token_dim``.
        init_weights: PEFT's option: ``"zero"`` starts the prefix (or the projection's last layer) at zero; None
            keeps the default random init.
        **fields: see `PromptLearningConfig`.

    Example:
        >>> PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True).peft_type
        'PREFIX_TUNING'
    """

    peft_type = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.encoder_hidden_size is None or self.encoder_hidden_size >= 1, "encoder_hidden_size",
                    self.encoder_hidden_size, "use an integer >= 1 or null (token_dim)")
