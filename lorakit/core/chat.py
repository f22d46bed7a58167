"""Conversations as the model sees them: rendered by the tokenizer's own chat template, turn by turn, with the
loss on the assistant turns.

A conversation is a sequence of ``(role, content)`` turns. `conversation_segments` renders it with the chat
template and cuts the text where each trained assistant turn starts and ends, found by rendering each prefix
of the conversation: the text before assistant turn i is the template's rendering of turns ``[:i]`` with the
generation prompt (exactly what the model reads at inference before answering), and the turn itself is what
rendering ``[:i + 1]`` adds to that, its end-of-turn tokens included. Each piece is tokenized on its own, as
at inference, where the prompt is tokenized and the answer generated after it.

A tokenizer without a chat template gets `PLAIN_TEMPLATE`: each non-assistant turn followed by a newline,
each assistant turn by the EOS token (a single turn: ``prompt + "\\n" + completion + EOS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .errors import DataError

__all__ = [
    "PLAIN_TEMPLATE",
    "TRAIN_ON",
    "TrainOn",
    "Turn",
    "conversation_segments",
    "generation_prompt",
    "render",
    "tokenize_conversation",
]

IGNORE_INDEX = -100
Turn = tuple[str, str]  # (role, content)
TrainOn = Literal["all_assistant", "last_assistant", "completion"]
TRAIN_ON: tuple[str, ...] = ("all_assistant", "last_assistant", "completion")
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
)


def render(tokenizer, turns: Sequence[Turn], add_generation_prompt: bool) -> str:
    """`turns` as text, by the tokenizer's chat template (`PLAIN_TEMPLATE` when it has none).

    Args:
        tokenizer: a Hugging Face tokenizer.
        turns: ``(role, content)`` pairs.
        add_generation_prompt: end with what opens an assistant turn (the prompt the model answers).

    Returns:
        The rendered text, special tokens written out as text.

    Raises:
        DataError: the template refuses the conversation (e.g. a role it does not know).
    """
    template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
    messages = [{"role": role, "content": content} for role, content in turns]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises TemplateError, templates raise their own exceptions for bad roles
        roles = [role for role, _ in turns]
        raise DataError(f"the model's chat template cannot render a conversation with roles {roles} ({err}); use the roles "
                        "it knows (system, user, assistant for most).") from None


def generation_prompt(tokenizer, turns: Sequence[Turn]) -> str:
    """What the model reads before answering `turns`: their rendering with the generation prompt.

    Args:
        tokenizer: a Hugging Face tokenizer.
        turns: the conversation so far, ending with the turn to answer.

    Returns:
        The text to tokenize and generate after.

    Raises:
        DataError: the template refuses the conversation.
    """
    return render(tokenizer, turns, add_generation_prompt=True)


def _trained_turns(turns: Sequence[Turn], train_on: str) -> list[int]:
    """Indices of the assistant turns whose text carries the loss (for "completion", the first, which runs to the end)."""
    assistant = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
    if not assistant:
        raise DataError("the conversation has no assistant turn: there is nothing to train on.")
    if assistant[0] == 0:
        raise DataError("the conversation starts with an assistant turn: put the user (or system) turn it answers first.")
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on={train_on!r}: use one of {list(TRAIN_ON)}.")
    return {"all_assistant": assistant, "last_assistant": assistant[-1:], "completion": assistant[:1]}[train_on]


def conversation_segments(tokenizer, turns: Sequence[Turn], train_on: str = "all_assistant") -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, trained)`` pieces; joined, they are the whole rendering.

    Trained pieces are assistant turns (``"all_assistant"``: every one; ``"last_assistant"``: the last) with
    the template's end-of-turn text, or with ``"completion"`` everything from the first assistant turn on
    (later user turns included). An assistant turn the template renders as its bare content (nothing marks its
    end) is followed by the EOS token, so the model learns to stop (the pieces then join to the rendering with
    those EOS tokens added).

    Args:
        tokenizer: a Hugging Face tokenizer.
        turns: ``(role, content)`` pairs with at least one assistant turn after a non-assistant one.
        train_on: ``"all_assistant"``, ``"last_assistant"`` or ``"completion"``.

    Returns:
        The pieces in order.

    Raises:
        DataError: no assistant turn, an assistant turn first, an unknown `train_on`, or a template whose rendering
            of a conversation does not start with its rendering of the conversation's beginning (the assistant
            spans cannot be found; ``train_on: last_assistant`` needs this only for the last turn).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for index in _trained_turns(turns, train_on):
        prompt = generation_prompt(tokenizer, turns[:index])
        end = len(turns) if train_on == "completion" else index + 1
        full = render(tokenizer, turns[:end], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the chat template renders a conversation differently from its beginning (e.g. it drops earlier turns' "
                "reasoning), so the assistant turns cannot be located; train on the last turn only (data.train_on: "
                "last_assistant) or set a prefix-consistent tokenizer.chat_template."
            )
        answer = full[len(prompt):]
        ending = tokenizer.eos_token if answer.strip() == turns[index][1].strip() and tokenizer.eos_token else ""
        segments += [(prompt[len(done):], False), (answer + ending, True)]
        done = full  # the template's own text: an added EOS is in the tokens only
    return [(text, trained) for text, trained in segments if text]


def tokenize_conversation(tokenizer, turns: Sequence[Turn], max_length: int, train_on: str = "all_assistant") -> dict:
    """Token ids of the rendered conversation, labels only on the trained pieces (-100 elsewhere).

    Each piece is tokenized on its own (as at inference: the prompt, then the generated answer).
    Conversations longer than `max_length` lose their first tokens; the last trained piece is kept whole with
    at least one token before it, even when that exceeds `max_length`.

    Args:
        tokenizer: a Hugging Face tokenizer.
        turns: ``(role, content)`` pairs (see `conversation_segments`).
        max_length: the most tokens kept.
        train_on: which turns carry the loss (see `conversation_segments`).

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, two lists of the same length.

    Raises:
        DataError: as `conversation_segments`.
    """
    ids: list[int] = []
    labels: list[int] = []
    last_trained_start = 0
    for text, trained in conversation_segments(tokenizer, turns, train_on):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            last_trained_start = len(ids)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    keep = max(max_length, len(ids) - last_trained_start + 1)
    return {"input_ids": ids[-keep:], "labels": labels[-keep:]}
