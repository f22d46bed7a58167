"""Training data: BIG-bench tasks read from the PyPI sdist, local JSONL/CSV/Parquet files, splits,
prompts and completion-only loss masks.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .atomic import atomic_write_text
from .errors import DataError
from .models import cache_dir

__all__ = [
    "Example", "Splits", "DataError", "load_examples", "split_examples", "format_prompt", "tokenize_example",
    "collate", "collate_classification", "completion_logprobs", "bigbench_archive",
]

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_PREFIX = "bigbench:"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One item. `target` is the completion trained on; `options` (multiple choice) and `label`
    (index of the right option, or a class id for classification) are for evaluation."""

    prompt: str
    target: str
    options: tuple[str, ...] = ()
    label: int | None = None
    targets: tuple[str, ...] = field(default=())  # every accepted answer (generative tasks)


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
    """Examples from ``bigbench:<task>[/<subtask>]`` or a local .jsonl/.json/.csv/.parquet file."""
    source = str(source)
    if source.startswith(BIGBENCH_PREFIX):
        return _bigbench_examples(source[len(BIGBENCH_PREFIX):])
    return _file_examples(Path(source).expanduser())


def split_examples(
    examples: Sequence[Example], seed: int = 0, test_size: int | float = 0.2, validation_size: int | float = 0.1,
    max_train: int | None = None,
) -> Splits:
    """Deterministic seeded train/validation/test split; sizes are counts or fractions of the whole."""
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


# -- prompts and tokens ----------------------------------------------------------------------------
def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model expects it: a user turn in its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def _prompt_and_completion(tokenizer, prompt: str, completion: str, add_eos: bool) -> tuple[str, str]:
    """Texts of the prompt and of the completion as the model sees them. With a chat template the
    completion is the assistant turn as the template renders it (with its end-of-turn tokens); where
    nothing marks the end of the answer, the EOS token does."""
    prompt_text = format_prompt(tokenizer, prompt)
    completion_text = completion
    if add_eos and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt_text):
            completion_text = full[len(prompt_text):]
    if add_eos and completion_text.rstrip() == completion.rstrip() and tokenizer.eos_token:
        completion_text += tokenizer.eos_token
    return prompt_text, completion_text


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int, add_eos: bool = True) -> dict:
    """Token ids of prompt + completion, with labels only on the completion (prompt masked with -100).

    ``add_eos`` ends the completion as the model ends a turn (chat template) or with the EOS token;
    scoring options uses ``add_eos=False``. Over-long items lose the start of the prompt, never the completion."""
    prompt_text, completion_text = _prompt_and_completion(tokenizer, prompt, completion, add_eos)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    keep = max(max_length - len(completion_ids), 1)
    prompt_ids = prompt_ids[-keep:]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad tokenized items into tensors (labels padded with -100).

    Left padding puts every completion at the end, so a model needs logits for the last few positions
    only (``logits_to_keep``); explicit position ids keep absolute-position models (GPT-2) exact."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, width - n :] = torch.tensor(item["input_ids"])
        labels[row, width - n :] = torch.tensor(item["labels"])
        mask[row, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def collate_classification(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad classification items ({input_ids, label}) into tensors."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["label"] for item in items])}


def completion_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled token of a left-padded batch, computing logits only where needed.

    Returns (logprobs, mask), both (batch, k): k covers the longest completion."""
    labels = batch["labels"]
    keep = int((labels != IGNORE_INDEX).sum(-1).max()) + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits.float()  # (batch, keep, vocab)
    targets = labels[:, -keep + 1 :]  # (batch, keep - 1)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != IGNORE_INDEX
    return logprobs * mask, mask
