"""LST on disk, in lorakit's own format (PEFT has no LST): ``lst_config.json`` (the `LSTConfig` and
``"method": "LST"``) and ``lst_model.safetensors`` (the side network's tensors under ``side.<name>``).
A folder has no ``adapter_config.json``, so PEFT refuses it at once ("Can't find adapter_config.json")
instead of misreading it. Writes are atomic (one folder swap); loads check every name and shape first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ...core.atomic import staged_directory
from ...core.errors import AdapterLoadError, LoraConfigError
from ...core.peft_format import check_replaceable, load_checked_tensors
from .config import LSTConfig

__all__ = ["LST_CONFIG", "LST_WEIGHTS", "is_lst_folder", "read_lst", "write_lst"]

LST_CONFIG = "lst_config.json"
LST_WEIGHTS = "lst_model.safetensors"


def is_lst_folder(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a saved LST side network.

    Args:
        directory: a folder.

    Returns:
        True when ``lst_config.json`` is there.
    """
    return (Path(directory) / LST_CONFIG).is_file()


def write_lst(directory: str | os.PathLike, config: LSTConfig, tensors: dict[str, Tensor]) -> None:
    """Write the config and the side network's tensors as one folder swapped into place.

    Args:
        directory: the folder; it is replaced whole.
        config: the `LSTConfig`.
        tensors: name -> tensor (contiguous, CPU).

    Raises:
        AdapterSaveError: `directory` is a file, or a folder holding other things than a saved side network.
    """
    target = Path(directory)
    check_replaceable(target, LST_CONFIG)
    with staged_directory(target) as staging:
        save_file(tensors, staging / LST_WEIGHTS, metadata={"format": "pt", "method": "LST"})
        (staging / LST_CONFIG).write_text(json.dumps({"method": "LST", **dataclasses.asdict(config)}, indent=2, sort_keys=True) + "\n")


def read_lst(directory: str | os.PathLike) -> tuple[LSTConfig, dict[str, Tensor]]:
    """The config and tensors of a saved side network; errors name the file and the reason.

    Args:
        directory: a folder written by `write_lst`.

    Returns:
        ``(config, tensors)``.

    Raises:
        AdapterLoadError: a file is missing, corrupt or not an LST save.
    """
    directory = Path(directory)
    config_path = directory / LST_CONFIG
    if not config_path.is_file():
        raise AdapterLoadError(f"{config_path} does not exist: {directory} is not a saved LST side network.")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{config_path} is not valid JSON ({err}); the file is corrupt.") from None
    if not isinstance(data, dict) or data.pop("method", None) != "LST":
        raise AdapterLoadError(f"{config_path} is not an LST config (no \"method\": \"LST\").")
    known = {f.name for f in dataclasses.fields(LSTConfig)}
    try:
        config = LSTConfig(**{k: v for k, v in data.items() if k in known})
    except (LoraConfigError, TypeError) as err:
        raise AdapterLoadError(f"{config_path} holds a config lorakit cannot use: {err}") from None
    weights = directory / LST_WEIGHTS
    if not weights.is_file():
        raise AdapterLoadError(f"{directory} has no {LST_WEIGHTS}: the side network's weights are missing.")
    return config, load_checked_tensors(weights)
