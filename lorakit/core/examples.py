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

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "collate",
    "collate_classification",
    "completion_logprobs",
    "format_prompt",
    "right_pad",
    "tokenize_example",
]

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


# -- prompts and tokens ----------------------------------------------------------------------------
def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model expects it: a user turn in its chat template when it has one.

    Args:
        tokenizer: a Hugging Face tokenizer; its ``chat_template``, when set, renders the prompt.
        prompt: the user's text.

    Returns:
        The user turn followed by the generation prompt, or without a chat template the prompt and a newline.
    """
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

    Args:
        tokenizer: a Hugging Face tokenizer; the prompt goes through `format_prompt`.
        prompt: the prompt text.
        completion: the completion text, the only tokens with labels.
        max_length: the most tokens kept. Over-long items lose the start of the prompt (at least one prompt token
            stays), never the completion, so a completion longer than this is kept whole.
        add_eos: end the completion as the model ends a turn (chat template) or with the EOS token; scoring
            options uses ``add_eos=False``.

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, two lists of the same length; labels are -100 on the prompt.
    """
    prompt_text, completion_text = _prompt_and_completion(tokenizer, prompt, completion, add_eos)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    keep = max(max_length - len(completion_ids), 1)
    prompt_ids = prompt_ids[-keep:]
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
        ``(logprobs, mask)``, both (batch, k) where k covers the longest completion: float32 log-probabilities
        (0 where not labelled) and True on labelled tokens.
    """
    labels = batch["labels"]
    keep = int((labels != IGNORE_INDEX).sum(-1).max()) + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits.float()  # (batch, keep, vocab)
    targets = labels[:, -keep + 1 :]  # (batch, keep - 1)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != IGNORE_INDEX
    return logprobs * mask, mask
