"""Evaluation metrics against values computed by hand (unpadded, full logits, one item at a time)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from offline_fixtures import write_tiny_model

from lorakit import LoraConfig, base_models, evaluate, get_lora_model
from lorakit.core.examples import Example, format_prompt
from lorakit.core.kv_cache import cache_keyword


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return base_models.load(write_tiny_model(tmp_path_factory.mktemp("model")))


def _by_hand(model, tokenizer, prompt: str, option: str) -> float:
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(option_ids))


EXAMPLES = [
    Example("3 even?", "no", ("yes", "no"), 1),
    Example("a much longer prompt: 10 even?", "yes", ("yes", "no", "maybe not"), 0),
    Example("?", "b", ("a", "b"), 1),
]


def test_option_logprobs_match_hand_computation(tiny):
    model, tokenizer = tiny
    scores = evaluate.option_logprobs(model, tokenizer, EXAMPLES, batch_size=4)  # mixed lengths in one batch
    for example, row in zip(EXAMPLES, scores):
        expected = [_by_hand(model, tokenizer, example.prompt, option) for option in example.options]
        assert row == pytest.approx(expected, abs=1e-4)


def test_the_cache_goes_under_the_name_the_model_takes(tiny):
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40): scoring uses the model's."""
    model, tokenizer = tiny
    wrapped = get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    assert cache_keyword(model) == cache_keyword(wrapped) == ("cache" if takes_cache else "past_key_values")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="`past_key_values` is deprecated", category=FutureWarning)
        evaluate.option_logprobs(wrapped, tokenizer, EXAMPLES, batch_size=4)
    wrapped.unload()


def test_multiple_choice_accuracy_and_majority(tiny):
    model, tokenizer = tiny
    scores = [[_by_hand(model, tokenizer, ex.prompt, o) for o in ex.options] for ex in EXAMPLES]
    expected = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, EXAMPLES)) / len(EXAMPLES)
    assert evaluate.multiple_choice_accuracy(model, tokenizer, EXAMPLES, batch_size=2) == pytest.approx(expected)
    assert evaluate.majority_rate(EXAMPLES) == pytest.approx(1 / 3)  # "no", "yes", "b" once each


def test_exact_match_against_one_by_one_greedy_decoding(tiny):
    model, tokenizer = tiny
    prompts = ["1+1", "a much longer prompt", "xyz"]
    answers = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    examples = [Example(prompts[0], answers[0]), Example(prompts[1], "wrong", targets=("wrong", answers[1])), Example(prompts[2], answers[2] + "!")]
    assert evaluate.exact_match(model, tokenizer, examples, batch_size=3, max_new_tokens=4) == pytest.approx(2 / 3)


def test_options_are_scored_alike_without_a_cache():
    """Models that keep no key/value cache (LST) get every (prompt, option) in a full pass: the same scores."""
    import torch
    from offline_fixtures import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.core.examples import Example
    from lorakit.training import evaluate

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()

    class WithoutCache(torch.nn.Module):
        returns_cache = False

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            return self.inner(**inputs)

    examples = [Example(prompt=f"{i} even?", target="yes", options=("yes", "no", "maybe so"), label=0) for i in range(5)]
    with_cache = evaluate.option_logprobs(model, tokenizer, examples)
    full_passes = evaluate.option_logprobs(WithoutCache(model), tokenizer, examples)
    for cached, full in zip(with_cache, full_passes):
        assert full == pytest.approx(cached, abs=1e-4)


def test_length_sorted_batches_give_each_example_its_own_scores_in_order(tiny):
    """Batches are formed by prompt length (not data order); every score still belongs to its own example."""
    import random

    model, tokenizer = tiny
    rng = random.Random(0)
    examples = [Example("word " * rng.randint(0, 12) + f"{i} even?", "yes", ("yes", "no", "maybe")[: 2 + i % 2], 0) for i in range(11)]
    scores = evaluate.option_logprobs(model, tokenizer, examples, batch_size=3)
    lengths = [len(tokenizer(format_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"]) for ex in examples]
    batches = evaluate.length_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(11)) and batches != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    assert all(max(lengths[i] for i in b) >= max(lengths[i] for i in later) for b, later in zip(batches, batches[1:]))
    for example, row in zip(examples, scores):
        assert row == pytest.approx([_by_hand(model, tokenizer, example.prompt, o) for o in example.options], abs=1e-4)
    one_by_one = [evaluate.token_loss(model, tokenizer, [ex], batch_size=1) for ex in examples]
    counts = [sum(label != -100 for label in evaluate.tokenize_example(tokenizer, ex, max_length=512)["labels"]) for ex in examples]
    pooled = sum(loss * n for loss, n in zip(one_by_one, counts)) / sum(counts)
    assert evaluate.token_loss(model, tokenizer, examples, batch_size=4) == pytest.approx(pooled, rel=1e-5)


def test_chat_examples_are_scored_after_their_whole_conversation(tiny):
    model, tokenizer = tiny
    turns = (("user", "2 even?"), ("assistant", "yes"), ("user", "3 even?"), ("assistant", "no"))
    chat = Example("3 even?", "no", ("yes", "no"), 1, messages=turns)
    assert format_prompt(tokenizer, chat) == "<user>2 even?<bot>yes<user>3 even?<bot>"
    (chat_scores,) = evaluate.option_logprobs(model, tokenizer, [chat])
    context = tokenizer("<user>2 even?<bot>yes<user>3 even?<bot>", add_special_tokens=False)["input_ids"]
    for option, score in zip(chat.options, chat_scores):
        ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([context + ids])).logits[0].double(), -1)
        assert score == pytest.approx(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(ids)), abs=1e-4)
