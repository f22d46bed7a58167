"""Chat data: the label mask covers exactly the assistant spans found by rendering each prefix of the
conversation with the tokenizer's own template, for SmolLM2's template, a system-prompt template, and
generated conversations."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from offline_fixtures import tiny_tokenizer

from lorakit.core.chat import conversation_segments, render, tokenize_conversation
from lorakit.core.errors import DataError
from lorakit.core.examples import IGNORE_INDEX, Example, format_prompt, tokenize_example
from lorakit.training import data

# The chat template SmolLM2-135M-Instruct ships (its tokenizer_config), as data.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are "
    "a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A Llama-2-like template: the system prompt folded into the first user turn, answers closed by </s>-like text.
SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]{% else %} {{ m['content'] }} <eos>{% endif %}{% endfor %}"
)
CONVERSATION = (
    ("system", "Answer in one word."), ("user", "Capital of France?"), ("assistant", "Paris"),
    ("user", "And of Italy?"), ("assistant", "Rome"), ("user", "Thanks!"), ("assistant", "Welcome"),
)


def chat_tokenizer(template: str | None):
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<bot>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


def reference_spans(tokenizer, turns, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the character spans of the trained turns, by rendering each prefix."""
    full = render(tokenizer, turns, add_generation_prompt=False)
    assistant = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    chosen = {"all_assistant": assistant, "last_assistant": assistant[-1:], "completion": assistant[:1]}[train_on]
    spans = []
    for i in chosen:
        start = len(render(tokenizer, turns[:i], add_generation_prompt=True))
        end = len(full) if train_on == "completion" else len(render(tokenizer, turns[: i + 1], add_generation_prompt=False))
        spans.append((start, end))
    return full, spans


def assert_mask_is_the_spans(tokenizer, turns, train_on: str) -> None:
    item = tokenize_conversation(tokenizer, turns, max_length=10_000, train_on=train_on)
    full, spans = reference_spans(tokenizer, turns, train_on)
    whole = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assert item["input_ids"] == whole["input_ids"]  # piecewise tokens = the whole rendering's tokens
    expected = [any(s <= start and stop <= e for s, e in spans) for start, stop in whole["offset_mapping"]]
    assert [label != IGNORE_INDEX for label in item["labels"]] == expected
    assert [label for label in item["labels"] if label != IGNORE_INDEX] == [t for t, x in zip(item["input_ids"], expected) if x]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "completion"])
@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, SYSTEM_TEMPLATE], ids=["smollm2", "system"])
def test_mask_is_the_assistant_spans(template, train_on):
    tokenizer = chat_tokenizer(template)
    assert_mask_is_the_spans(tokenizer, CONVERSATION, train_on)
    assert_mask_is_the_spans(tokenizer, CONVERSATION[1:], train_on)  # SmolLM2 adds its default system prompt


def test_smollm2_turns_end_with_the_end_of_turn_token():
    tokenizer = chat_tokenizer(SMOLLM2_TEMPLATE)
    item = tokenize_conversation(tokenizer, CONVERSATION, max_length=10_000)
    trained = tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])
    assert trained == "Paris<|im_end|>\nRome<|im_end|>\nWelcome<|im_end|>\n"
    last = tokenize_conversation(tokenizer, CONVERSATION, max_length=10_000, train_on="last_assistant")
    assert tokenizer.decode([t for t in last["labels"] if t != IGNORE_INDEX]) == "Welcome<|im_end|>\n"


def test_plain_template_and_templates_without_turn_ends_get_eos():
    plain = chat_tokenizer(None)
    assert render(plain, CONVERSATION[1:3], False) == "Capital of France?\nParis<eos>"
    bare = chat_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # marks no turn's end
    item = tokenize_conversation(bare, (("user", "Q"), ("assistant", "A")), max_length=100)
    assert bare.decode([t for t in item["labels"] if t != IGNORE_INDEX]) == "A<eos>"


def test_single_turn_is_the_prompt_completion_item():
    tokenizer = chat_tokenizer(SMOLLM2_TEMPLATE)
    example = Example("hi", "yo", messages=(("user", "hi"), ("assistant", "yo")))
    assert tokenize_example(tokenizer, example, max_length=64) == tokenize_example(tokenizer, "hi", "yo", max_length=64)
    assert format_prompt(tokenizer, Example("Thanks!", "Welcome", messages=CONVERSATION)) == \
        render(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)


def test_truncation_keeps_the_last_answer_whole():
    tokenizer = chat_tokenizer(SMOLLM2_TEMPLATE)
    whole = tokenize_conversation(tokenizer, CONVERSATION, max_length=10_000)
    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=40)
    assert len(cut["input_ids"]) == 40 and cut["input_ids"] == whole["input_ids"][-40:]
    tiny = tokenize_conversation(tokenizer, CONVERSATION, max_length=3)
    answer = len(tokenizer("Welcome<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert len(tiny["input_ids"]) == answer + 1 and tiny["labels"][0] == IGNORE_INDEX


def test_inconsistent_templates_and_bad_conversations_are_refused():
    forgetful = chat_tokenizer(  # shows only the last turn of the history, like templates that drop earlier reasoning
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }};{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="last_assistant"):
        conversation_segments(forgetful, CONVERSATION, "all_assistant")
    assert conversation_segments(forgetful, CONVERSATION, "last_assistant")[-1] == ("Welcome;", True)
    tokenizer = chat_tokenizer(SMOLLM2_TEMPLATE)
    with pytest.raises(DataError, match="no assistant turn"):
        conversation_segments(tokenizer, (("user", "hi"),))
    with pytest.raises(DataError, match="starts with an assistant"):
        conversation_segments(tokenizer, (("assistant", "hi"), ("user", "x"), ("assistant", "y")))
    strict = chat_tokenizer("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('unknown role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="roles it knows"):
        conversation_segments(strict, (("tool", "x"), ("user", "hi"), ("assistant", "y")))


roles = st.sampled_from(["system", "user", "assistant", "tool"])
text = st.text(alphabet="abc xyz?!.\n", min_size=0, max_size=12)


@st.composite
def conversations(draw):
    turns = [(draw(st.sampled_from(["system", "user", "tool"])), draw(text))]
    turns += draw(st.lists(st.tuples(roles, text), max_size=6))
    return tuple(turns) + (("assistant", draw(text)),)


@settings(max_examples=60, deadline=None)
@given(conversations(), st.sampled_from(["all_assistant", "last_assistant", "completion"]),
       st.sampled_from([SMOLLM2_TEMPLATE, None]))
def test_generated_conversations_mask_the_assistant_spans(turns, train_on, template):
    assert_mask_is_the_spans(chat_tokenizer(template), turns, train_on)


@pytest.mark.slow
def test_real_smollm2_tokenizer_masks_the_assistant_spans():
    from lorakit.training import base_models

    tokenizer = base_models.load("smollm2-135m-instruct")[1]
    for train_on in ("all_assistant", "last_assistant", "completion"):
        assert_mask_is_the_spans(tokenizer, CONVERSATION, train_on)
        assert_mask_is_the_spans(tokenizer, CONVERSATION[1:], train_on)


def test_chat_rows_keep_roles_and_malformed_rows_are_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}, {"messages": [{"role": "user", "content": "x"}]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"row 2: column 'messages' must end with an assistant message"):
        data.load_examples(path)
    path.write_text(json.dumps(rows[0]) + "\n")
    (example,) = list(data.load_examples(path))
    assert example.messages == CONVERSATION and (example.prompt, example.target) == ("Thanks!", "Welcome")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 9), st.sampled_from([
    ({"messages": "hello"}, "column 'messages' must be a non-empty list"),
    ({"messages": []}, "column 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, "column 'messages', message 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "column 'messages', message 2"),
    ({"prompt": None, "completion": "a"}, "column 'prompt' is null"),
    ({"prompt": "q", "completion": [1]}, "column 'completion' is list"),
]))
def test_a_malformed_row_is_named_by_row_and_column(tmp_path_factory, position, bad):
    row, message = bad
    good = {"prompt": "q", "completion": "a"} if "prompt" in row else {"messages": [{"role": "user", "content": "q"},
                                                                                    {"role": "assistant", "content": "a"}]}
    path = tmp_path_factory.mktemp("rows") / "data.json"  # one JSON array: mixed types stay as they are written
    rows = [good] * 10
    rows[position] = row
    path.write_text(json.dumps(rows))
    try:
        data.load_examples(path)
    except DataError as err:
        assert f"row {position + 1}" in str(err) and message in str(err)
    else:
        pytest.fail("no DataError")
