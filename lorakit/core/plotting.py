"""Figures as PNG files: matplotlib on its file-only backend, written through the one atomic-write helper."""

from __future__ import annotations

import os
from typing import IO, Any

from .atomic import atomic_write

__all__ = ["pyplot", "save_png"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, which needs no display; imported on first use so that importing
    lorakit stays fast.

    Returns:
        The ``matplotlib.pyplot`` module.

    Example:
        >>> plt = pyplot()
        >>> figure, axis = plt.subplots()
        >>> plt.close(figure)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure: Any, path: str | os.PathLike | IO[bytes], dpi: int = 110) -> None:
    """Write `figure` as a PNG and close it.

    Args:
        figure: a matplotlib figure.
        path: a file path (written atomically: the old file or the new one, never half of one) or a binary file object.
        dpi: the resolution.

    Example:
        >>> import io
        >>> figure, axis = pyplot().subplots()
        >>> buffer = io.BytesIO()
        >>> save_png(figure, buffer)
        >>> buffer.getvalue()[:4]
        b'\\x89PNG'
    """
    try:
        if hasattr(path, "write"):
            figure.savefig(path, dpi=dpi, format="png")
        else:
            atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=dpi, format="png"))
    finally:
        pyplot().close(figure)
