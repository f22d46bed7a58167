"""Where lorakit keeps what it can rebuild (SVD decompositions, converted models, BIG-bench)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """lorakit's cache: ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``. Safe to delete."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
