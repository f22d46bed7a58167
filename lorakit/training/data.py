"""Training data: BIG-bench tasks read from the PyPI sdist, local JSONL/CSV/Parquet files, and splits.
(Prompts, tokens and loss masks are `lorakit.core.examples`.)

BIG-bench: ``bigbench:<task>`` or ``bigbench:<task>/<subtask>``. The sdist ``bigbench==1.0.0``
(Apache-2.0) is fetched once with ``pip download --no-deps`` into the lorakit cache; each task.json
is read straight from the archive the first time and kept beside it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import atomic_write_text
from ..core.cache import cache_dir
from ..core.errors import DataError
from ..core.examples import Example

__all__ = ["Splits", "bigbench_archive", "load_examples", "split_examples"]

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_PREFIX = "bigbench:"


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


# -- BIG-bench -------------------------------------------------------------------------------------
def bigbench_archive() -> Path:
    """The bigbench sdist in the cache, downloaded once with pip."""
    folder = cache_dir() / "bigbench"
    archive = folder / f"bigbench-{BIGBENCH_VERSION}.tar.gz"
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", f"bigbench=={BIGBENCH_VERSION}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        raise DataError(f"could not fetch BIG-bench with `{' '.join(command)}`:\n{result.stderr[-2000:]}")
    return archive


def _bigbench_task_json(task: str) -> dict:
    cached = cache_dir() / "bigbench" / "tasks" / task / "task.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    member_suffix = f"/bigbench/benchmark_tasks/{task}/task.json"
    with tarfile.open(bigbench_archive()) as tar:
        member = next((m for m in tar if m.name.endswith(member_suffix)), None)
        if member is None:
            raise DataError(f"BIG-bench has no task {task!r} (looked for ...{member_suffix}); names look like 'navigate' or 'logical_deduction/three_objects'.")
        text = tar.extractfile(member).read().decode()
    atomic_write_text(cached, text)
    return json.loads(text)


def _bigbench_examples(task: str) -> list[Example]:
    spec = _bigbench_task_json(task)
    prefix = spec.get("task_prefix", "")
    append_choices = spec.get("append_choices_to_input", True)
    examples = []
    for item in spec.get("examples", []):
        prompt = prefix + item["input"]
        if "target_scores" in item:
            options = list(item["target_scores"])
            random.Random(zlib.crc32(item["input"].encode())).shuffle(options)  # the answer's position gives nothing away
            options = tuple(options)
            label = max(range(len(options)), key=lambda k: item["target_scores"][options[k]])
            if append_choices:
                prompt += "".join(f"\n  choice: {option}" for option in options)
            examples.append(Example(prompt, options[label], options, label))
        else:
            targets = item["target"] if isinstance(item["target"], list) else [item["target"]]
            examples.append(Example(prompt, targets[0], targets=tuple(targets)))
    if not examples:
        raise DataError(f"BIG-bench task {task!r} has no examples (it is programmatic); pick a JSON task.")
    return examples


# -- local files -----------------------------------------------------------------------------------
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _text(row: dict, column: str, where: str) -> str:
    """The row's `column` as text: strings as they are, numbers spelled out; null or nested values refused."""
    value = row[column]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    shown = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: column {column!r} is {shown}; it must hold text. Fix or drop that row.")


def _row_to_example(row: dict, labels: list, where: str) -> Example:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: column 'messages' must be a list of {{role, content}} objects with text content.")
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: a chat example must end with an assistant message (the completion trained on).")
        prompt = "\n".join(m["content"] for m in messages[:-1])
        return Example(prompt, messages[-1]["content"])
    if "prompt" in row and "completion" in row:
        return Example(_text(row, "prompt", where), _text(row, "completion", where))
    if "text" in row and "label" in row:
        if row["label"] is None:
            raise DataError(f"{where}: column 'label' is null; every row needs a label.")
        return Example(_text(row, "text", where), str(row["label"]), tuple(map(str, labels)), labels.index(row["label"]))
    raise DataError(f"{where} has columns {sorted(row)}; lorakit reads prompt/completion, messages, or text/label.")


def _file_examples(path: Path) -> list[Example]:
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)}.")
    if not path.is_file():
        raise DataError(f"{path} does not exist.")
    from datasets import load_dataset

    try:
        rows = list(load_dataset(kind, data_files=str(path), split="train"))
    except Exception as err:  # datasets raises many types for malformed files
        cause = err.__cause__ or err
        raise DataError(
            f"{path} could not be read as {kind} ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}): "
            "check that it is complete, UTF-8, and one record per line (JSONL) or row (CSV)."
        ) from None
    if not rows:
        raise DataError(f"{path} holds no rows: add examples (prompt/completion, messages, or text/label).")
    labels = sorted({row["label"] for row in rows if row.get("label") is not None}, key=str)
    return [_row_to_example(row, labels, f"{path}, row {number}") for number, row in enumerate(rows, start=1)]


def load_examples(source: str | os.PathLike) -> list[Example]:
    """Examples from ``bigbench:<task>[/<subtask>]`` or a local .jsonl/.json/.csv/.parquet file.

    Args:
        source: ``bigbench:<task>[/<subtask>]`` (BIG-bench is fetched once into the lorakit cache) or a file
            whose rows have prompt/completion, messages, or text/label columns.

    Returns:
        The examples, in the source's order.

    Raises:
        DataError: the task or file does not exist or cannot be read, it holds no examples, or a row has no usable columns.
    """
    source = str(source)
    if source.startswith(BIGBENCH_PREFIX):
        return _bigbench_examples(source[len(BIGBENCH_PREFIX):])
    return _file_examples(Path(source).expanduser())


def split_examples(
    examples: Sequence[Example], seed: int = 0, test_size: int | float = 0.2, validation_size: int | float = 0.1,
    max_train: int | None = None,
) -> Splits:
    """Deterministic seeded train/validation/test split; sizes are counts or fractions of the whole.

    Args:
        examples: all the examples.
        seed: seeds the shuffle.
        test_size: test items, a count (int) or a fraction of all examples (float).
        validation_size: validation items, likewise; 0 for none.
        max_train: keep at most this many training items (None: all).

    Returns:
        `Splits` of train, validation and test items, disjoint, from one seeded shuffle.

    Raises:
        DataError: a non-zero size gives no item, or the test and validation items leave no training item.
    """
    order = list(examples)
    random.Random(seed).shuffle(order)
    count = lambda size: int(size * len(order)) if isinstance(size, float) else int(size)  # noqa: E731
    n_test, n_validation = count(test_size), count(validation_size)
    if (test_size and n_test == 0) or (validation_size and n_validation == 0):
        raise DataError(f"{len(order)} examples give no test or validation item at sizes {test_size}/{validation_size}: use counts or larger fractions.")
    if n_test + n_validation >= len(order):
        raise DataError(f"{len(order)} examples cannot give {n_test} test and {n_validation} validation items and a training set.")
    test, validation = order[:n_test], order[n_test : n_test + n_validation]
    train = order[n_test + n_validation :]
    return Splits(train[:max_train] if max_train else train, validation, test)


