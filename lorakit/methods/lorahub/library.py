"""A LoraHub module library on disk: one training run per task and an index, ``library.json``.

```
LIBRARY/
  library.json     {"modules": [{"task", "folder", "adapter", "steps", "best_step", "stopped_early",
                                 "validation_loss", "accuracy_before", "accuracy_after", "seconds"}, ...]}
  library.png      own-task accuracy before and after, per module
  <folder>/        the task's ordinary training run (adapter/, summary.md, metrics.jsonl, checkpoints/)
```

`lorakit hub build` writes it (`lorakit.training.hub_build`); `lorakit hub learn --modules LIBRARY` and
`load_modules` read it through `library_adapters`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ...core.errors import LoraConfigError

__all__ = ["INDEX", "expand_libraries", "library_adapters", "read_index"]

INDEX = "library.json"


def read_index(library: str | os.PathLike) -> list[dict]:
    """The module records of a library folder's index.

    Args:
        library: the library folder.

    Returns:
        One record per module, in the order built.

    Raises:
        LoraConfigError: the folder has no readable ``library.json``.
    """
    path = Path(library) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        return list(index["modules"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LoraConfigError(f"{path} is missing or not a lorakit library index: build the library with "
                              "`lorakit hub build --tasks ... --out LIBRARY`.") from None


def library_adapters(library: str | os.PathLike) -> list[Path]:
    """The adapter folders of a library's modules.

    Args:
        library: the library folder.

    Returns:
        ``LIBRARY/<folder>/adapter`` for each module in the index.

    Raises:
        LoraConfigError: the index is missing or names an adapter that is not there.
    """
    adapters = [Path(library) / record["adapter"] for record in read_index(library)]
    missing = [str(path) for path in adapters if not path.is_dir()]
    if missing:
        raise LoraConfigError(f"the library index lists {missing[0]}, which is not there: rebuild with `lorakit hub build`.")
    return adapters


def expand_libraries(items: Sequence) -> list:
    """Module sources with every library folder replaced by its modules' adapter folders (others unchanged).

    Args:
        items: adapter folders, library folders (holding ``library.json``) or in-memory modules.

    Returns:
        The items, libraries expanded in place.

    Example:
        >>> expand_libraries(["adapters/a", "adapters/b"])  # no library among them: unchanged
        ['adapters/a', 'adapters/b']
    """
    expanded = []
    for item in items:
        is_library = isinstance(item, (str, os.PathLike)) and (Path(item) / INDEX).is_file()
        expanded += library_adapters(item) if is_library else [item]
    return expanded
