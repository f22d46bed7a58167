"""`PromptModel`: prompt tuning, P-tuning and prefix tuning around a Hugging Face model (`AdapterModel`).

The wrapped model is not changed; each adapter owns an encoder in ``prompt_encoder[name]`` that makes its
virtual tokens (prompt tuning, P-tuning: prepended to the input embeddings) or its per-layer keys and values
(prefix tuning: given to the model as a filled key/value cache). Callers never see virtual positions:
the attention masks, position ids and labels they pass cover their own tokens, the logits returned cover
their own tokens, and a cache returned by the model can be passed back as usual. One adapter is active at
a time (as in PEFT); mixed-adapter batches are refused.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...core.adapter_model import AdapterModel
from ...core.errors import AdapterLoadError, LoraConfigError, LoraError, MixedBatchError, UnsupportedModelError
from ...core.examples import IGNORE_INDEX
from ...core.kv_cache import cache_keyword
from ...core.peft_format import SavedAdapter, check_tensors
from ...core.saved_modules import saved_module_parameters, saved_module_shapes
from ...core.targeting import module_names, plan_modules_to_save
from .config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from .encoders import PrefixEncoder, PromptEncoder, PromptTable, fold
from .kinds import model_kind, resolve_shapes
from .prefix import prefix_cache

__all__ = ["PromptModel", "get_prompt_model"]

SAVED_PREFIX = "base_model."  # PEFT's prompt models hold the base model directly, so saved modules are keyed base_model.<path>


class PromptModel(AdapterModel):
    """A model with prompt-method adapters (prompt tuning, P-tuning, prefix tuning / P-tuning v2).

    Args:
        model: a causal LM, an encoder-decoder LM or an encoder (e.g. BERT for classification).
        config: the first adapter's config, or None to add adapters later.
        adapter_name: the first adapter's name.
        tokenizer: the model's tokenizer, for ``prompt_tuning_init="TEXT"`` (else ``tokenizer_name_or_path`` is loaded).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                     num_hidden_layers=2, num_attention_heads=4))
        >>> model = PromptModel(base, PromptTuningConfig(num_virtual_tokens=5))
        >>> model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape  # logits cover the caller's tokens
        torch.Size([1, 3, 64])
    """

    config_types: ClassVar[dict[str, type]] = {
        "PROMPT_TUNING": PromptTuningConfig, "P_TUNING": PromptEncoderConfig, "PREFIX_TUNING": PrefixTuningConfig,
    }
    merge_refusal: ClassVar[str | None] = (
        "prompt tuning, P-tuning and prefix tuning add inputs (virtual tokens, keys/values), not weight updates: there is "
        "nothing to merge. Keep the adapter, or use LoRA/IA3 for a mergeable one."
    )

    def __init__(self, model: nn.Module, config: PromptLearningConfig | None = None, adapter_name: str = "default",
                 tokenizer: Any = None) -> None:
        super().__init__(model)
        self.kind = model_kind(model)
        parameters = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in parameters
        self._cache_keyword = cache_keyword(model)
        self.prompt_encoder = nn.ModuleDict()
        self._disabled = False
        if config is not None:
            self._add_first(adapter_name, config, tokenizer)

    def _add_first(self, adapter_name: str, config: Any, tokenizer: Any = None) -> None:
        try:
            self.add_adapter(adapter_name, config, tokenizer=tokenizer)
        except BaseException:
            self.restore_original_flags()
            raise

    def _journal_extra(self) -> Any:
        return dict(self.prompt_encoder.items())

    def _rollback_extra(self, saved: Any) -> None:
        for name in [n for n in self.prompt_encoder if n not in saved]:
            del self.prompt_encoder[name]

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: PromptLearningConfig, *, tokenizer: Any = None, initialize: bool = True) -> None:
        """Add adapter `name`; it becomes active only if no adapter is active yet. A failure changes nothing.

        Args:
            name: the new adapter's name.
            config: a `PromptTuningConfig`, `PromptEncoderConfig` or `PrefixTuningConfig`.
            tokenizer: the model's tokenizer, for ``prompt_tuning_init="TEXT"``.
            initialize: run the config's init; False allocates the saved (folded) form to be filled from a file.

        Raises:
            AdapterNameError: the name is invalid or taken.
            LoraConfigError: the config is of another method, or its shapes contradict the model.
            UnsupportedModelError: the method is not available for this kind of model.
        """
        self._check_new(name, config)
        config = resolve_shapes(self.model, config)
        _check_supported(self.kind, config)
        saved = plan_modules_to_save(self.model, config, module_names(self.model))
        weight = self.model.get_input_embeddings().weight
        with self.transaction():
            self.peft_config[name] = config
            encoder = _make_encoder(config) if initialize else PromptTable(*_folded_shape(config))
            if initialize and isinstance(config, PromptTuningConfig) and config.prompt_tuning_init != "RANDOM":
                _init_from_vocabulary(encoder, config, self.model.get_input_embeddings(), tokenizer)
            self.prompt_encoder[name] = encoder.to(weight.device)
            self._add_saved_modules(name, saved)
            self.set_adapter(self.active_adapters or [name])

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make one adapter active (prompt methods run one at a time, as in PEFT).

        Args:
            names: the adapter's name (or a one-element sequence).

        Raises:
            AdapterNameError: the name is not an adapter of this model.
            LoraConfigError: more than one adapter is named.
        """
        names = [names] if isinstance(names, str) else list(names)
        if len(names) != 1:
            raise LoraConfigError(f"prompt methods run one adapter at a time; got {names}. Name one adapter.")
        super().set_adapter(names)

    def _set_trainable(self) -> None:
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name in self.active_adapters)
        for _, wrapper in self.saved_modules():
            for name, module in wrapper.copies.items():
                module.requires_grad_(name in wrapper.active_adapters)

    def _delete_extra(self, name: str) -> None:
        if name in self.prompt_encoder:
            del self.prompt_encoder[name]

    def _set_disabled(self, disabled: bool) -> None:
        self._disabled = disabled

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Refused: virtual tokens and prefixes are inputs, not weights, so there is nothing to fold.

        Args:
            adapter_names: ignored.

        Raises:
            LoraError: always.
        """
        raise LoraError(self.merge_refusal)

    def merge_and_unload(self) -> nn.Module:
        """Refused, as `merge_adapter`.

        Raises:
            LoraError: always.
        """
        raise LoraError(self.merge_refusal)

    # -- the virtual tokens -----------------------------------------------------------------------
    def _active(self) -> tuple[str, PromptLearningConfig] | None:
        if self._disabled or not self.active_adapters:
            return None
        name = self.active_adapters[0]
        return name, self.peft_config[name]

    def prompts(self, name: str | None = None) -> Tensor:
        """Adapter `name`'s table (default: the active one): virtual tokens (total, token_dim), or the prefix
        (num_virtual_tokens, num_layers * 2 * token_dim); with gradients when training.

        Args:
            name: an adapter name, or None for the active adapter.

        Returns:
            The encoder's output.
        """
        return self.prompt_encoder[name or self.active_adapters[0]]()

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None, past_key_values: Any = None,
                token_type_ids: Tensor | None = None, adapter_names: Sequence[str] | None = None, cache: Any = None, **kwargs):
        """Call the wrapped model with the active adapter's virtual tokens or prefix.

        Args:
            input_ids: (batch, seq) token ids, or None with `inputs_embeds`.
            attention_mask: (batch, seq) over the caller's tokens (a continuation: over cached and new tokens).
            inputs_embeds: (batch, seq, dim) instead of `input_ids`.
            position_ids: (batch, seq) positions of the caller's tokens (virtual tokens come first, so they shift by
                ``num_virtual_tokens``).
            labels: (batch, seq) labels of the caller's tokens; virtual tokens are never in the loss.
            past_key_values: a cache returned by this model (its virtual tokens are in it already).
            cache: the same under transformers 5's name; give one of the two.
            token_type_ids: (batch, seq) segment ids (BERT); virtual tokens get segment 0.
            adapter_names: refused unless every row names the active adapter: prompt methods have no mixed batches.
            **kwargs: other inputs of the wrapped model (``use_cache``, ``logits_to_keep``, ``decoder_input_ids``...).

        Returns:
            The wrapped model's output, its logits over the caller's tokens only.

        Raises:
            MixedBatchError: `adapter_names` asks for a mixed batch.
        """
        self._refuse_rows(adapter_names)
        past_key_values = cache if cache is not None else past_key_values
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds, "position_ids": position_ids,
                  "labels": labels, self._cache_keyword: past_key_values, "token_type_ids": token_type_ids, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        active = self._active()
        if active is None:
            return self.model(**inputs)
        name, config = active
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, width = reference.shape[0], reference.shape[1]
        n = config.num_virtual_tokens
        continuing = past_key_values is not None and _cached_length(past_key_values) > 0
        if self.kind != "seq2seq":
            _shift_inputs(inputs, n)
        if continuing:
            return self.model(**inputs)
        if isinstance(config, PrefixTuningConfig):
            inputs[self._cache_keyword] = prefix_cache(self.model, config, self.prompts(name), batch)
            if "decoder_attention_mask" in inputs:  # the prefix sits in the decoder's self-attention
                inputs["decoder_attention_mask"] = _ones_before(inputs["decoder_attention_mask"], n)
            return self.model(**inputs)
        return self._with_virtual_tokens(inputs, config, self.prompts(name), batch, width)

    def _with_virtual_tokens(self, inputs: dict, config: PromptLearningConfig, table: Tensor, batch: int, width: int):
        """Prepend the virtual tokens to the (encoder's) input embeddings; strip them from the logits."""
        n = config.num_virtual_tokens
        embeds = inputs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.model.get_input_embeddings()(inputs.pop("input_ids"))
        virtual = table[:n].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, n, dim): encoder prompts
        inputs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (batch, n + seq, dim)
        if self.kind == "seq2seq":
            if "attention_mask" in inputs:
                inputs["attention_mask"] = _ones_before(inputs["attention_mask"], n)
            return self.model(**inputs)
        if "token_type_ids" in inputs:  # virtual tokens are in segment 0
            segments = inputs["token_type_ids"]
            inputs["token_type_ids"] = torch.cat([segments.new_zeros(batch, n), segments], dim=1)
        if "position_ids" in inputs:
            first = torch.arange(n, device=embeds.device).expand(batch, n)
            inputs["position_ids"] = torch.cat([first, inputs["position_ids"]], dim=1)
        if self.kind != "causal":
            return self.model(**inputs)
        if not inputs.get("logits_to_keep") and self._keeps_logits:
            # the LM head runs on the caller's tokens only (no logits to cut off afterwards); with labels also on the
            # last virtual position, which predicts the first token in PEFT's loss
            skipped = 1 if "labels" in inputs else 0
            inputs["logits_to_keep"] = width + skipped
        else:
            skipped = n
        if "labels" in inputs:
            inputs["labels"] = torch.cat([torch.full((batch, skipped), IGNORE_INDEX, device=embeds.device), inputs["labels"]], dim=1)
        output = self.model(**inputs)
        logits = getattr(output, "logits", None)
        if logits is not None and logits.shape[1] > width:
            output.logits = logits[:, -width:]  # (batch, seq, vocab): the caller's tokens
        return output

    def _refuse_rows(self, adapter_names: Sequence[str] | None) -> None:
        if adapter_names is not None and set(adapter_names) != set(self.active_adapters):
            raise MixedBatchError(
                "prompt methods have no mixed-adapter batches (each row would need its own sequence length or cache); "
                "run one adapter per batch with set_adapter()."
            )

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """The wrapped model's ``generate`` with the active adapter's virtual tokens or prefix; batched generation
        with left padding works as for the base model.

        Args:
            *args: refused; pass ``input_ids=`` by keyword.
            adapter_names: refused unless every row names the active adapter.
            **kwargs: ``input_ids``, ``attention_mask`` and the wrapped model's generation arguments.

        Returns:
            As the wrapped model: for causal LMs the input ids followed by the new tokens (batch, seq + new).

        Raises:
            MixedBatchError: `adapter_names` asks for a mixed batch.
            LoraConfigError: `input_ids` is missing or passed by position.
        """
        self._refuse_rows(adapter_names)
        active = self._active()
        if active is None:
            return self.model.generate(*args, **kwargs)
        if args or kwargs.get("input_ids") is None:
            raise LoraConfigError("PromptModel.generate takes input_ids=... (and attention_mask=...) as keywords.")
        from .generation import generate_with_prompts

        name, config = active
        with torch.no_grad():
            table = self.prompts(name)
        return generate_with_prompts(self.model, self.kind, config, table, kwargs)

    # -- files (PEFT format) ----------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> Iterator[tuple[str, Tensor]]:
        """``prompt_embeddings`` (the folded table PEFT saves, computed from the encoder) and modules_to_save.

        Args:
            name: the adapter's name.

        Yields:
            ``(key, tensor)`` under PEFT's keys; ``prompt_embeddings`` is computed, the others are live parameters.
        """
        yield "prompt_embeddings", fold(self.prompt_encoder[name])
        yield from saved_module_parameters(self.model, name, SAVED_PREFIX)

    def training_state(self, name: str) -> dict[str, Tensor]:
        """Everything adapter `name` trains: the encoder's parameters (embedding, MLP/LSTM, prefix projection) and
        modules_to_save copies, for exact resumption.

        Args:
            name: the adapter's name.

        Returns:
            Name -> live tensor.
        """
        state = {f"prompt_encoder.{key}": value for key, value in self.prompt_encoder[name].named_parameters()}
        return state | dict(saved_module_parameters(self.model, name, SAVED_PREFIX))

    def _check_fits(self, model: nn.Module, adapter: SavedAdapter, source) -> None:
        try:
            config = resolve_shapes(model, adapter.config)
            _check_supported(model_kind(model), config)
        except LoraError as err:
            raise AdapterLoadError(f"the adapter in {source} does not fit this model: {err}") from None
        expected = {"prompt_embeddings": _folded_shape(config)} | saved_module_shapes(model, config, SAVED_PREFIX)
        check_tensors(adapter.tensors, expected, source)

    def _apply_saved(self, name: str, adapter: SavedAdapter, is_trainable: bool) -> None:
        """Load the folded table: P-tuning's encoder and the prefix projection are not saved (as in PEFT), so a
        loaded adapter trains its virtual tokens directly."""
        with self.transaction():
            self.add_adapter(name, adapter.config, initialize=False)
            live = {"prompt_embeddings": self.prompt_encoder[name].embedding.weight} | dict(saved_module_parameters(self.model, name, SAVED_PREFIX))
            self._fill(live, adapter.tensors, is_trainable)
        if not is_trainable:
            self.eval()


def _cached_length(cache: Any) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if cache else 0


def _ones_before(mask: Tensor, n: int) -> Tensor:
    """(batch, n + seq): `n` ones, then `mask`."""
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _shift_inputs(inputs: dict, n: int) -> None:
    """Make the caller's mask and positions cover the `n` virtual positions before its tokens."""
    if "attention_mask" in inputs:
        inputs["attention_mask"] = _ones_before(inputs["attention_mask"], n)
    if "position_ids" in inputs:
        inputs["position_ids"] = inputs["position_ids"] + n


def _check_supported(kind: str, config: PromptLearningConfig) -> None:
    if kind == "encoder" and isinstance(config, PrefixTuningConfig):
        raise UnsupportedModelError(
            "prefix tuning needs a model that takes a key/value cache (a decoder or encoder-decoder); encoder-only models "
            "such as BERT do not (PEFT refuses them too). Use prompt tuning or P-tuning there."
        )


def _make_encoder(config: PromptLearningConfig) -> nn.Module:
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config)
    return PromptTable(config.total_virtual_tokens, config.token_dim)


def _folded_shape(config: PromptLearningConfig) -> tuple[int, int]:
    """The shape of the saved ``prompt_embeddings``."""
    if isinstance(config, PrefixTuningConfig):
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
    return config.total_virtual_tokens, config.token_dim


def _init_from_vocabulary(table: PromptTable, config: PromptTuningConfig, embeddings: nn.Module, tokenizer: Any) -> None:
    """Prompt tuning's text init (Lester et al. 2021, Sec. 3.2), as PEFT: the init text's token ids repeated or cut
    to the number of virtual tokens; or ``SAMPLE_VOCAB``: random token ids."""
    total = config.total_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, embeddings.weight.shape[0], (total,)).tolist()
    else:
        if tokenizer is None:
            if not config.tokenizer_name_or_path:
                raise LoraConfigError("prompt_tuning_init='TEXT' needs the model's tokenizer: pass tokenizer=... or set "
                                      "tokenizer_name_or_path to a local tokenizer folder.")
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, local_files_only=True, **(config.tokenizer_kwargs or {}))
            except OSError as err:
                raise LoraConfigError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} is not a local tokenizer ({err}).") from None
        ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise LoraConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} has no tokens; give a longer text.")
        ids = (ids * math.ceil(total / len(ids)))[:total]
    with torch.no_grad():
        values = embeddings(torch.tensor(ids, device=embeddings.weight.device)).float()  # (total, dim)
        table.embedding.weight.copy_(values)


def get_prompt_model(model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default", tokenizer: Any = None) -> PromptModel:
    """Wrap `model` with a prompt-method adapter; on error `model` is unchanged.

    Args:
        model: a causal LM, an encoder-decoder LM or an encoder model.
        config: a `PromptTuningConfig`, `PromptEncoderConfig` or `PrefixTuningConfig`.
        adapter_name: the adapter's name, which becomes the active one.
        tokenizer: the model's tokenizer, for ``prompt_tuning_init="TEXT"``.

    Returns:
        The `PromptModel`.

    Raises:
        AdapterNameError: `adapter_name` is not a valid adapter name.
        LoraConfigError: the config is not a prompt method's, or does not fit the model.
        UnsupportedModelError: the method is not available for this kind of model.
    """
    return PromptModel(model, config, adapter_name, tokenizer)
