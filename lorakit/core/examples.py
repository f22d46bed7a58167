"""Examples and their tokens: the unit of text every method and the trainer share.

An `Example` is a prompt, the completion trained on and, for evaluation, options or a label.
`tokenize_example` masks the prompt out of the loss (labels -100), `collate` left-pads a batch so every
completion ends at the last position, and `completion_logprobs` scores completion tokens computing
logits only where they are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .chat import IGNORE_INDEX, Turn, generation_prompt, tokenize_conversation

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "collate",
    "collate_classification",
    "completion_logprobs",
    "conversation",
    "format_prompt",
    "right_pad",
    "tokenize_example",
]



@dataclass(frozen=True)
class Example:
    """One item. `target` is the completion trained on; `options` (multiple choice) and `label`
    (index of the right option, or a class id for classification) are for evaluation. A chat example also keeps
    its whole conversation in `messages` (`prompt` is then its last user turn, `target` its last assistant one)."""

    prompt: str
    target: str
    options: tuple[str, ...] = ()
    label: int | None = None
    targets: tuple[str, ...] = field(default=())  # every accepted answer (generative tasks)
    messages: tuple[Turn, ...] = ()  # a chat example's (role, content) turns, ending with the assistant's `target`


# -- prompts and tokens ----------------------------------------------------------------------------
def conversation(example: Example) -> tuple[Turn, ...]:
    """The example as chat turns: its own ``messages``, or the prompt as a user turn answered by the target.

    Args:
        example: the example.

    Returns:
        ``(role, content)`` pairs ending with the assistant turn trained on.
    """
    return example.messages or (("user", example.prompt), ("assistant", example.target))


def format_prompt(tokenizer, prompt: str | Example) -> str:
    """The prompt as the model reads it before answering: rendered by its chat template with the generation prompt.

    Args:
        tokenizer: a Hugging Face tokenizer; its ``chat_template`` renders the prompt (`chat.PLAIN_TEMPLATE` without one).
        prompt: the user's text, or an example, whose conversation up to its last assistant turn is rendered.

    Returns:
        The rendered turns followed by the generation prompt (without a chat template: the prompt and a newline).
    """
    turns = conversation(prompt)[:-1] if isinstance(prompt, Example) else (("user", prompt),)
    return generation_prompt(tokenizer, turns)


def tokenize_example(tokenizer, prompt: str | Example, completion: str | None = None, max_length: int = 512,
                     add_eos: bool = True, train_on: str = "all_assistant") -> dict:
    """Token ids of a prompt and its completion (or an example's conversation), labels only where the loss is.

    Args:
        tokenizer: a Hugging Face tokenizer; the text is rendered by its chat template (see `chat`).
        prompt: the prompt text, or an `Example` (its ``messages``, or its prompt and target).
        completion: the completion text, the only tokens with labels (None with an `Example`).
        max_length: the most tokens kept. Over-long items lose their first tokens, never the last trained turn (at
            least one token before it stays), so a completion longer than this is kept whole.
        add_eos: end the completion as the model ends a turn (chat template) or with the EOS token; scoring
            options uses ``add_eos=False`` (the bare completion after the generation prompt).
        train_on: for conversations, which assistant turns carry the loss (see `chat.conversation_segments`).

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, two lists of the same length; labels are -100 where no loss is.

    Raises:
        DataError: the chat template cannot render the conversation or locate its assistant turns.
    """
    turns = conversation(prompt) if isinstance(prompt, Example) else (("user", prompt), ("assistant", completion))
    if add_eos:
        return tokenize_conversation(tokenizer, turns, max_length, train_on)
    prompt_ids = tokenizer(generation_prompt(tokenizer, turns[:-1]), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(turns[-1][1], add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[-max(max_length - len(completion_ids), 1):]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad tokenized items into tensors (labels padded with -100).

    Left padding puts every completion at the end, so a model needs logits for the last few positions
    only (``logits_to_keep``); explicit position ids keep absolute-position models (GPT-2) exact.

    Args:
        items: tokenized items with ``input_ids`` and ``labels`` lists (as from `tokenize_example`).
        pad_id: the token id that fills the padding.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``, each a long tensor (batch, longest item).
    """
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


def right_pad(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists padded on the right into one tensor.

    Args:
        sequences: one list of token ids (or labels) per row.
        pad_value: what fills the padding (a pad token id, or -100 for labels).

    Returns:
        ``(values, mask)``, both (batch, longest): the padded values and 1 where a value is real.
    """
    width = max(len(sequence) for sequence in sequences)
    values = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        values[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return values, mask


def collate_classification(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad classification items ({input_ids, label}) into tensors.

    Args:
        items: dicts with ``input_ids`` (a list of token ids) and ``label`` (a class id).
        pad_id: the token id that fills the padding.

    Returns:
        ``input_ids`` and ``attention_mask``, both (batch, longest item), and ``labels`` (batch,).
    """
    ids, mask = right_pad([item["input_ids"] for item in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["label"] for item in items])}


def completion_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled token of a left-padded batch, computing logits only where needed.

    Args:
        model: a causal LM whose forward accepts ``logits_to_keep``.
        batch: a left-padded batch as from `collate`; its ``labels`` choose the scored tokens and the other
            entries go to the model.

    Returns:
        ``(logprobs, mask)``, both (batch, k) where k covers every row's labelled tokens (from its first one to its
        end): float32 log-probabilities (0 where not labelled) and True on labelled tokens.
    """
    labels = batch["labels"]
    labelled = labels != IGNORE_INDEX  # (batch, width); a conversation's answers need not all be at its end
    first = labelled.int().argmax(-1)[labelled.any(-1)]  # (rows with labels,) the first labelled position
    keep = min(max((labels.shape[1] - first).tolist(), default=0) + 1, labels.shape[1])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits.float()  # (batch, keep, vocab)
    targets = labels[:, -keep + 1 :]  # (batch, keep - 1)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != IGNORE_INDEX
    return logprobs * mask, mask
