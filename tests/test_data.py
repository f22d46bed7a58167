"""Data readers, splits, prompts and completion-only masking."""

from __future__ import annotations

import json

import pytest
from offline_fixtures import multiple_choice_task, tiny_tokenizer, write_fake_bigbench

from lorakit import data
from lorakit.core import examples
from lorakit.core.errors import DataError
from lorakit.core.examples import IGNORE_INDEX, Example


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bigbench_multiple_choice_generative_and_subtask(cache):
    write_fake_bigbench(cache, {
        "parity": multiple_choice_task(10),
        "sum": {"task_prefix": "Add. ", "examples": [{"input": "1+1", "target": ["2", "two"]}, {"input": "2+2", "target": "4"}]},
        "deduce/three": {"examples": [{"input": "pick", "target_scores": {"x": 0, "y": 0.5, "z": 1}}]},
        "last": {"examples": [{"input": f"{i} times 3?", "target_scores": {str(i + 1): 0, str(i * 3): 1}} for i in range(40)]},
    })
    parity = data.load_examples("bigbench:parity")
    assert parity[3].prompt == "3 even?" and parity[3].target == "no" and set(parity[3].options) == {"yes", "no"}
    assert parity[3].options[parity[3].label] == "no"
    generative = data.load_examples("bigbench:sum")
    assert generative[0] == Example("Add. 1+1", "2", targets=("2", "two"))
    deduce = data.load_examples("bigbench:deduce/three")[0]
    assert set(deduce.options) == {"x", "y", "z"} and deduce.options[deduce.label] == "z" == deduce.target
    assert deduce.prompt == "pick" + "".join(f"\n  choice: {o}" for o in deduce.options)  # append_choices_to_input default
    last = data.load_examples("bigbench:last")  # the file lists the right answer last every time
    assert {ex.label for ex in last} == {0, 1} and last == data.load_examples("bigbench:last")  # shuffled, deterministically
    assert (cache / "bigbench" / "tasks" / "parity" / "task.json").is_file()  # read from the archive once
    with pytest.raises(DataError, match="no task 'navigat'"):
        data.load_examples("bigbench:navigat")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", "y"]})
    path = tmp_path / f"d{suffix}"
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True), ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    assert list(data.load_examples(path)) == [Example("a", "x"), Example("b", "y")]


def test_save_to_disk_folders(tmp_path):
    import datasets

    rows = {"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    assert list(data.load_examples(tmp_path / "one")) == [Example("a", "x"), Example("b", "y"), Example("c", "z")]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "splits"))
    assert len(data.load_examples(tmp_path / "splits")) == 3
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="no 'train' split"):
        data.load_examples(tmp_path / "no_train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        data.load_examples(tmp_path / "plain")


def test_a_large_file_is_read_row_by_row(tmp_path):
    """20 MB of rows: loading, splitting and tokenizing the training split allocate far less than the examples would
    take as Python objects (each row is read from the memory-mapped table when asked for), and give the same items."""
    import tracemalloc

    from lorakit.training.tasks import CompletionTask

    path = tmp_path / "big.jsonl"
    with open(path, "w") as stream:
        for i in range(10_000):
            stream.write(json.dumps({"prompt": f"question {i} " + "x" * 2000, "completion": f"answer {i}"}) + "\n")
    data.load_examples(path)  # the Arrow cache is built once (its conversion is not what is measured)
    tracemalloc.start()
    rows = data.load_examples(path)
    splits = data.split_examples(rows, seed=0, test_size=100, validation_size=10)
    items = CompletionTask().items(tiny_tokenizer(), splits.train, max_length=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < path.stat().st_size / 4, f"{peak / 2**20:.1f} MiB allocated for a {path.stat().st_size / 2**20:.1f} MiB file"
    reference = data.split_examples(list(rows), seed=0, test_size=100, validation_size=10)
    assert splits.test == reference.test and [splits.train[i] for i in (0, 7, -1)] == [reference.train[i] for i in (0, 7, -1)]
    assert items[5] == examples.tokenize_example(tiny_tokenizer(), reference.train[5], max_length=64)


def test_chat_and_classification_rows(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    assert list(data.load_examples(chat)) == [Example("hi", "yo", messages=(("user", "hi"), ("assistant", "yo")))]
    labelled = tmp_path / "cls.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in [("good", "pos"), ("bad", "neg")]))
    assert data.load_examples(labelled)[0] == Example("good", "pos", ("neg", "pos"), 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match="prompt/completion, messages, or text/label"):
        data.load_examples(bad)


def test_splits_are_seeded_disjoint_and_complete():
    examples = [Example(str(i), "t") for i in range(100)]
    first, again, other = (data.split_examples(examples, seed, 20, 0.1) for seed in (1, 1, 2))
    assert first == again and first != other
    assert (len(first.test), len(first.validation), len(first.train)) == (20, 10, 70)
    assert sorted(e.prompt for e in first.train + first.validation + first.test) == sorted(e.prompt for e in examples)


def test_prompt_uses_chat_template_and_masks_prompt():
    tokenizer = tiny_tokenizer()
    assert examples.format_prompt(tokenizer, "2 even?") == "<user>2 even?<bot>"
    item = examples.tokenize_example(tokenizer, "2 even?", "yes", max_length=64)
    n_prompt = len(tokenizer("<user>2 even?<bot>", add_special_tokens=False)["input_ids"])
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(item["labels"][n_prompt:]) == "yes<eos>"
    short = examples.tokenize_example(tokenizer, "a long prompt " * 10, "yes", max_length=12)
    assert len(short["input_ids"]) == 12 and tokenizer.decode(short["labels"][-4:]) == "yes<eos>"
