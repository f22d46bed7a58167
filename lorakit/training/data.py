"""Training data: BIG-bench tasks read from the PyPI sdist, local JSONL/JSON/CSV/Parquet files and save_to_disk
folders (read row by row from a memory-mapped Arrow table), chat rows, and splits.
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

__all__ = ["Splits", "TableExamples", "bigbench_archive", "load_examples", "split_examples"]

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_PREFIX = "bigbench:"


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of a data set; `train` is read on demand for a local data set (see `TableExamples`)."""

    train: Sequence[Example]
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


def _turns(messages, where: str) -> tuple[tuple[str, str], ...]:
    """A ``messages`` cell as (role, content) turns, ending with the assistant turn trained on."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: column 'messages' must be a non-empty list of {{role, content}} objects.")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: column 'messages', message {number} must be an object with text 'role' and 'content' "
                            f"(it is {str(message)[:80]}).")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: column 'messages' must end with an assistant message (the answer trained on).")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: column 'messages' starts with an assistant message: put the turn it answers first.")
    return tuple((m["role"], m["content"]) for m in messages)


def _row_to_example(row: dict, labels: list, where: str) -> Example:
    if "messages" in row:
        turns = _turns(row["messages"], where)
        prompt = next(content for role, content in reversed(turns[:-1]) if role != "assistant")
        return Example(prompt, turns[-1][1], messages=turns)
    if "prompt" in row and "completion" in row:
        return Example(_text(row, "prompt", where), _text(row, "completion", where))
    if "text" in row and "label" in row:
        if row["label"] is None:
            raise DataError(f"{where}: column 'label' is null; every row needs a label.")
        return Example(_text(row, "text", where), str(row["label"]), tuple(map(str, labels)), labels.index(row["label"]))
    raise DataError(f"{where} has columns {sorted(row)}; lorakit reads prompt/completion, messages, or text/label.")


class TableExamples(Sequence[Example]):
    """The rows of a local data set as examples, read from its memory-mapped Arrow table when asked for (never all
    in memory). `take` gives a view of some rows.

    Args:
        table: a ``datasets.Dataset``.
        where: names the source in errors.
        labels: the sorted labels of a text/label table ([] otherwise).
        indices: the rows this view shows (None: all).
    """

    def __init__(self, table, where: str, labels: list, indices: Sequence[int] | None = None) -> None:
        self.table, self.where, self.labels = table, where, labels
        self.indices = range(len(table)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.indices[index]
        return _row_to_example(self.table[row], self.labels, f"{self.where}, row {row + 1}")

    def take(self, indices: Sequence[int]) -> TableExamples:
        """A view of the rows at `indices` (positions in this view).

        Args:
            indices: positions, in the order wanted.

        Returns:
            The view.
        """
        return TableExamples(self.table, self.where, self.labels, [self.indices[i] for i in indices])


def _open_table(path: Path):
    """`path` as a ``datasets.Dataset``: a save_to_disk folder, or a file converted once to a memory-mapped Arrow cache."""
    import datasets

    if path.is_dir():
        try:
            table = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk; name a data file or such a folder.") from None
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise DataError(f"{path} holds the splits {sorted(table)} and no 'train' split; save the one to train on alone.")
            table = table["train"]
        return table
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)} or a save_to_disk folder.")
    if not path.is_file():
        raise DataError(f"{path} does not exist.")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for malformed files
        cause = err.__cause__ or err
        raise DataError(
            f"{path} could not be read as {kind} ({type(cause).__name__}: {' '.join(str(cause).split())[:300]}): "
            "check that it is complete, UTF-8, and one record per line (JSONL) or row (CSV)."
        ) from None


def _file_examples(path: Path) -> TableExamples:
    table = _open_table(path)
    if len(table) == 0:
        raise DataError(f"{path} holds no rows: add examples (prompt/completion, messages, or text/label).")
    labels, checked = [], 0
    try:
        if "label" in table.column_names and "messages" not in table.column_names:
            labels = sorted((label for label in table.unique("label") if label is not None), key=str)
        for checked, row in enumerate(table, start=1):  # every row checked now, one at a time, none kept
            _row_to_example(row, labels, f"{path}, row {checked}")
    except UnicodeDecodeError:
        raise DataError(f"{path}, row {checked + 1} (or a label) is not UTF-8 text: save the file as UTF-8.") from None
    return TableExamples(table, str(path), labels)


def load_examples(source: str | os.PathLike) -> Sequence[Example]:
    """Examples from ``bigbench:<task>[/<subtask>]``, a local .jsonl/.json/.csv/.parquet file or a save_to_disk folder.

    Every row of a local data set is checked here, one at a time; its examples are then read from the
    memory-mapped Arrow table when asked for, so a data set larger than memory is never held whole.

    Args:
        source: ``bigbench:<task>[/<subtask>]`` (BIG-bench is fetched once into the lorakit cache), or a file or
            ``datasets.save_to_disk`` folder whose rows have prompt/completion, messages (chat turns), or text/label columns.

    Returns:
        The examples, in the source's order: a list for BIG-bench, a `TableExamples` view for local data.

    Raises:
        DataError: the task or file does not exist or cannot be read, it holds no examples, or a row is malformed (the
            message names the row and the column).
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
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = lambda size: int(size * len(order)) if isinstance(size, float) else int(size)  # noqa: E731
    n_test, n_validation = count(test_size), count(validation_size)
    if (test_size and n_test == 0) or (validation_size and n_validation == 0):
        raise DataError(f"{len(order)} examples give no test or validation item at sizes {test_size}/{validation_size}: use counts or larger fractions.")
    if n_test + n_validation >= len(order):
        raise DataError(f"{len(order)} examples cannot give {n_test} test and {n_validation} validation items and a training set.")
    test, validation = ([examples[i] for i in order[start:stop]] for start, stop in ((0, n_test), (n_test, n_test + n_validation)))
    train = order[n_test + n_validation :][:max_train] if max_train else order[n_test + n_validation :]
    return Splits(examples.take(train) if isinstance(examples, TableExamples) else [examples[i] for i in train], validation, test)


