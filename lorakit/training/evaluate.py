"""Evaluation: multiple choice by option log-likelihood, generative by exact match after greedy
decoding, classification by accuracy."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from ..core.errors import UnsupportedModelError
from ..core.examples import (
    IGNORE_INDEX,
    Example,
    collate,
    completion_logprobs,
    format_prompt,
    tokenize_example,
)
from ..core.kv_cache import cache_keyword, returned_cache

__all__ = [
    "classification_accuracy",
    "evaluate",
    "exact_match",
    "length_batches",
    "majority_rate",
    "multiple_choice_accuracy",
    "option_logprobs",
    "token_loss",
]


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Evaluate without dropout, then put the model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first: each batch is padded to its own longest item, so
    sorted batches carry little padding. Results are put back in the data's order by the callers.

    Args:
        lengths: each item's token count.
        batch_size: items per batch.

    Returns:
        The batches of indices; together a permutation of ``range(len(lengths))``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _prompt_ids(tokenizer, examples: Sequence[Example], max_length: int | None = None) -> list[list[int]]:
    """Each example's prompt as the model reads it (its conversation up to the answer), as token ids (the last `max_length`)."""
    ids = [tokenizer(format_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"] for ex in examples]
    return [prompt[-max_length:] for prompt in ids] if max_length else ids


def option_logprobs(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_length: int = 512) -> list[list[float]]:
    """For each example, the summed log-likelihood of each option given the prompt.

    The prompt runs once per example; every option continues from the prompt's cached keys and values,
    so k options cost one prompt pass plus k short ones instead of k full passes. Batches hold prompts of
    similar length (`length_batches`); the scores come back in the examples' order.

    Args:
        model: a causal LM that returns a key/value cache (``use_cache=True``), or one whose ``returns_cache`` is
            False (LST), whose options are scored in full passes.
        tokenizer: its tokenizer, with a pad token.
        examples: multiple-choice examples; their options are scored.
        batch_size: examples per forward.
        max_length: prompt tokens kept (the last ones).

    Returns:
        Per example, one log-likelihood per option, in the order of its options.

    Raises:
        UnsupportedModelError: the model returns no key/value cache.
    """
    prompts = _prompt_ids(tokenizer, examples, max_length)
    scores: list[list[float]] = [[] for _ in examples]
    for batch in tqdm(length_batches([len(p) for p in prompts], batch_size), desc="scoring options", leave=False):
        chunk_scores = _score_options(model, tokenizer, [examples[i] for i in batch], [prompts[i] for i in batch])
        for index, option_scores in zip(batch, chunk_scores):
            scores[index] = option_scores
    return scores


@torch.no_grad()
def _score_options_without_cache(model, tokenizer, chunk: Sequence[Example], prompts: list[list[int]]) -> list[list[float]]:
    """Each (prompt, option) pair in one full forward pass, for models that keep no key/value cache (LST)."""
    device, pad_id = next(model.parameters()).device, tokenizer.pad_token_id
    pairs, owners = [], []
    for row, (ex, prompt) in enumerate(zip(chunk, prompts)):
        for option in ex.options:
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            pairs.append({"input_ids": prompt + option_ids, "labels": [IGNORE_INDEX] * len(prompt) + option_ids})
            owners.append(row)
    batch = {k: v.to(device) for k, v in collate(pairs, pad_id).items()}
    logprobs, _ = completion_logprobs(model, batch)  # (pairs, k)
    scores: list[list[float]] = [[] for _ in chunk]
    for owner, total in zip(owners, logprobs.sum(-1).tolist()):
        scores[owner].append(total)
    return scores


@torch.no_grad()
def _score_options(model, tokenizer, chunk: Sequence[Example], prompts: list[list[int]]) -> list[list[float]]:
    device, pad_id = next(model.parameters()).device, tokenizer.pad_token_id
    if not getattr(model, "returns_cache", True):
        return _score_options_without_cache(model, tokenizer, chunk, prompts)
    prompt = {k: v.to(device) for k, v in collate([{"input_ids": p, "labels": p} for p in prompts], pad_id).items()}
    out = model(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], position_ids=prompt["position_ids"],
                use_cache=True, logits_to_keep=1)
    cache, keyword = returned_cache(out), cache_keyword(model)
    if cache is None:
        raise UnsupportedModelError(f"{type(model).__name__} returned no key/value cache; multiple-choice scoring needs use_cache.")
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (batch, vocab): the first option token
    prompt_lengths = prompt["attention_mask"].sum(-1, keepdim=True)  # (batch, 1)
    scores: list[list[float]] = [[] for _ in chunk]
    for k in range(max(len(ex.options) for ex in chunk)):
        options = [tokenizer(ex.options[k], add_special_tokens=False)["input_ids"] if k < len(ex.options) else [pad_id] for ex in chunk]
        width = max(len(o) for o in options)
        ids = torch.tensor([o + [pad_id] * (width - len(o)) for o in options], device=device)  # (batch, width)
        mask = torch.tensor([[1] * len(o) + [0] * (width - len(o)) for o in options], device=device)
        logits = model(
            input_ids=ids, attention_mask=torch.cat([prompt["attention_mask"], mask], 1),
            position_ids=prompt_lengths + torch.arange(width, device=device), use_cache=True, **{keyword: cache},
        ).logits.float()  # (batch, width, vocab)
        cache.crop(-width)  # drop this option: the prompt alone again for the next one
        rest = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (batch, width - 1)
        total = first.gather(-1, ids[:, :1]).squeeze(-1) + (rest * mask[:, 1:]).sum(-1)  # (batch,)
        for row, ex in enumerate(chunk):
            if k < len(ex.options):
                scores[row].append(total[row].item())
    return scores


def multiple_choice_accuracy(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> float:
    """Share of items whose highest-likelihood option is the right one.

    Args:
        model: a causal LM that returns a key/value cache.
        tokenizer: its tokenizer, with a pad token.
        examples: multiple-choice examples with their right option's index as label (at least one).
        batch_size: examples per forward.

    Returns:
        The accuracy, in [0, 1].

    Raises:
        UnsupportedModelError: the model returns no key/value cache.
    """
    scores = option_logprobs(model, tokenizer, examples, batch_size)
    hits = [max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples)]
    return sum(hits) / len(hits)


def majority_rate(examples: Sequence[Example]) -> float:
    """Accuracy of always answering the most common right answer: the bar to beat.

    Args:
        examples: the examples (at least one).

    Returns:
        The share of examples whose target is the most common one, in [0, 1].
    """
    counts = Counter(ex.target for ex in examples)
    return counts.most_common(1)[0][1] / len(examples)


@torch.no_grad()
def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int = 8, max_new_tokens: int = 32) -> float:
    """Greedy decoding; a hit when the stripped output equals one accepted answer. Batches hold prompts of
    similar length (`length_batches`).

    Args:
        model: a model with ``generate``.
        tokenizer: its tokenizer, with a pad token.
        examples: the examples; ``targets`` (else ``target``) are the accepted answers.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: the most tokens generated per answer.

    Returns:
        The share of hits, in [0, 1].
    """
    device = next(model.parameters()).device
    hits = 0
    all_prompts = _prompt_ids(tokenizer, examples)
    for indices in tqdm(length_batches([len(p) for p in all_prompts], batch_size), desc="generating", leave=False):
        chunk, prompts = [examples[i] for i in indices], [all_prompts[i] for i in indices]
        batch = collate([{"input_ids": p, "labels": p} for p in prompts], tokenizer.pad_token_id)
        output = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
        for ex, row in zip(chunk, output[:, batch["input_ids"].shape[1] :]):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            hits += answer in {t.strip() for t in (ex.targets or (ex.target,))}
    return hits / len(examples)


@torch.no_grad()
def token_loss(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_length: int = 512,
               train_on: str = "all_assistant") -> float:
    """Mean cross-entropy over completion tokens (the training objective) on `examples`, in eval mode.

    Args:
        model: a causal LM whose forward accepts ``logits_to_keep``.
        tokenizer: its tokenizer, with a pad token.
        examples: the examples; the loss is on their targets.
        batch_size: examples per forward.
        max_length: the most tokens per example (see `tokenize_example`).
        train_on: which assistant turns of chat examples are scored (see `tokenize_example`).

    Returns:
        The mean cross-entropy per completion token, in nats.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    all_items = [tokenize_example(tokenizer, ex, max_length=max_length, train_on=train_on) for ex in examples]
    with eval_mode(model):
        for indices in length_batches([len(item["input_ids"]) for item in all_items], batch_size):
            batch = {k: v.to(device) for k, v in collate([all_items[i] for i in indices], tokenizer.pad_token_id).items()}
            total += -completion_logprobs(model, batch)[0].sum().item()
            count += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> dict[str, float]:
    """Accuracy by the task's kind (options -> multiple choice, else exact match) and the majority rate.

    Args:
        model: the model, evaluated in eval mode (its mode is restored after).
        tokenizer: its tokenizer, with a pad token.
        examples: the test examples (at least one); options on the first make it multiple choice.
        batch_size: examples per forward (halved for generation).

    Returns:
        ``{"accuracy": ..., "majority": ..., "items": ...}``: the accuracy, the majority rate and the number of examples.

    Raises:
        UnsupportedModelError: a multiple-choice task on a model that returns no key/value cache.
    """
    with eval_mode(model):
        if examples and examples[0].options:
            accuracy = multiple_choice_accuracy(model, tokenizer, examples, batch_size)
        else:
            accuracy = exact_match(model, tokenizer, examples, max(batch_size // 2, 1))
    return {"accuracy": accuracy, "majority": majority_rate(examples), "items": len(examples)}


@torch.no_grad()
def classification_accuracy(model, items: Sequence[dict], pad_id: int, batch_size: int = 64) -> float:
    """Share of items ({input_ids, label}) whose arg-max class is the label, in eval mode.

    Args:
        model: a sequence classifier whose output has ``logits`` (batch, classes).
        items: dicts with ``input_ids`` (a list of token ids) and ``label`` (a class id), at least one.
        pad_id: the token id that fills the padding.
        batch_size: items per forward.

    Returns:
        The accuracy, in [0, 1].
    """
    from ..core.examples import collate_classification

    device = next(model.parameters()).device
    hits = 0
    with eval_mode(model):
        for indices in tqdm(length_batches([len(item["input_ids"]) for item in items], batch_size), desc="classifying", leave=False):
            batch = {k: v.to(device) for k, v in collate_classification([items[i] for i in indices], pad_id).items()}
            labels = batch.pop("labels")
            hits += int((model(**batch).logits.argmax(-1) == labels).sum())
    return hits / len(items)
