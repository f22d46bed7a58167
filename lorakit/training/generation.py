"""Talking to a model and its adapters: what `lorakit generate` and `lorakit chat` run.

`Speakers` holds a base model with any number of saved adapters side by side, of every kind lorakit saves.
LoRA adapters share one wrapped model and answer in one mixed batch (each row through its own adapter,
``adapter_names``), and so do IA3 adapters; a prompt-method adapter or an LST side network has its own copy of
the base. Prompts are rendered by the tokenizer's chat template with the generation prompt, exactly as in
training.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..core.chat import Turn, generation_prompt
from ..core.errors import AdapterNameError, LoraConfigError
from ..core.examples import collate

__all__ = ["Sampling", "Speakers", "chat", "generate_answers", "parse_adapter_flags", "say"]

BASE = "base"  # the name of the bare model's answers when no adapter is given


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded.

    Attributes:
        max_new_tokens: the most tokens per answer.
        temperature: 0 decodes greedily; above 0 samples at this temperature.
        top_p: nucleus sampling's probability mass (with ``temperature > 0``).
        seed: seeds sampling, so a sampled answer can be had again.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LoraConfigError(f"--max-new-tokens {self.max_new_tokens}: use an integer >= 1.")
        if self.temperature < 0:
            raise LoraConfigError(f"--temperature {self.temperature}: use 0 (greedy) or a positive number.")
        if not 0 < self.top_p <= 1:
            raise LoraConfigError(f"--top-p {self.top_p}: use a number in (0, 1].")

    def generate_kwargs(self, pad_id: int) -> dict:
        """Keyword arguments for ``generate``.

        Args:
            pad_id: the tokenizer's padding id.

        Returns:
            ``max_new_tokens``, ``do_sample``, ``pad_token_id`` and, when sampling, ``temperature`` and ``top_p``.
        """
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0, "pad_token_id": pad_id}
        return kwargs | ({"temperature": self.temperature, "top_p": self.top_p} if self.temperature > 0 else {})


def parse_adapter_flags(flags: Sequence[str]) -> list[tuple[str, str]]:
    """``--adapter`` values as (name, folder): ``NAME=DIR``, or a bare ``DIR`` named after its folder.

    Args:
        flags: the values, in order.

    Returns:
        One (name, folder) per flag.

    Raises:
        AdapterNameError: two adapters get the same name.
        LoraConfigError: a folder does not exist.
    """
    adapters: list[tuple[str, str]] = []
    for flag in flags:
        name, sep, folder = flag.partition("=")
        if not sep or os.path.isdir(flag):
            name, folder = os.path.basename(os.path.normpath(flag)), flag
        if not os.path.isdir(folder):
            raise LoraConfigError(f"--adapter {flag}: {folder!r} is not a folder; give DIR or NAME=DIR of a saved adapter.")
        if name in {n for n, _ in adapters}:
            raise AdapterNameError(f"two adapters are named {name!r}: name them apart with --adapter NAME=DIR.")
        adapters.append((name, folder))
    return adapters


@dataclass
class _Group:
    """One model and the adapters that answer through it (several: a mixed batch)."""

    model: torch.nn.Module
    names: list[str]
    mixed: bool


class Speakers:
    """A base model with adapters side by side, each answering every prompt.

    Args:
        model: the base model (a causal LM).
        tokenizer: its tokenizer.
        adapters: (name, folder) of each saved adapter (LoRA, IA3, prompt tuning, P-tuning, prefix tuning, LST);
            none: the base model answers, as ``"base"``.

    Raises:
        AdapterLoadError: an adapter is missing, corrupt, or does not fit the model (every one is read before any
            is loaded).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, adapters: Sequence[tuple[str, str]]) -> None:
        from ..core.lora_model import LoraModel
        from ..methods.ia3.model import IA3Model
        from ..methods.lst.files import is_lst_folder, read_lst
        from ..methods.peft_methods import load_peft_model, model_class_for, read_any_adapter

        self.tokenizer = tokenizer
        kinds: dict[object, list[tuple[str, str]]] = {}
        for name, folder in adapters:  # all read and checked first
            if is_lst_folder(folder):
                read_lst(folder)
                kinds[(name, "lst")] = [(name, folder)]
                continue
            model_class = model_class_for(read_any_adapter(folder).config)
            key = model_class if model_class in (LoraModel, IA3Model) else (name, model_class)  # these route rows: one batch
            kinds.setdefault(key, []).append((name, folder))
        self.groups: list[_Group] = []
        if not adapters:
            self.groups.append(_Group(model.eval(), [BASE], mixed=False))
        for index, members in enumerate(kinds.values()):
            base = model if index == len(kinds) - 1 else copy.deepcopy(model)  # the last group takes the model itself
            wrapped = load_peft_model(base, members[0][1], adapter_name=members[0][0])
            for name, folder in members[1:]:
                wrapped.load_adapter(folder, name)
            self.groups.append(_Group(wrapped.eval(), [name for name, _ in members], mixed=len(members) > 1))
        self.names = [name for group in self.groups for name in group.names]

    @torch.no_grad()
    def answer(self, conversations: dict[str, Sequence[Turn]], sampling: Sampling = Sampling(),
               stream: Callable[[str], None] | None = None) -> dict[str, str]:
        """Each speaker's answer to its conversation (a mixed batch per group of LoRA or IA3 adapters).

        Args:
            conversations: speaker name -> the turns so far, ending with the turn to answer.
            sampling: how to decode.
            stream: with a single speaker, called with each piece of text as it is generated.

        Returns:
            Speaker name -> the answer's text (special tokens removed, stripped).
        """
        answers: dict[str, str] = {}
        torch.manual_seed(sampling.seed)
        for group in self.groups:
            extra = {"adapter_names": group.names} if group.mixed else {}
            if stream is not None and len(self.names) == 1:
                extra["streamer"] = _CallbackStreamer(self.tokenizer, stream)
            texts = generate_answers(group.model, self.tokenizer, [conversations[name] for name in group.names], sampling, **extra)
            answers |= dict(zip(group.names, texts))
        return answers


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: Sequence[Sequence[Turn]], sampling: Sampling = Sampling(), **extra) -> list[str]:
    """One answer per conversation, generated in one left-padded batch.

    Args:
        model: a causal LM (or a model wrapping one) with ``generate``.
        tokenizer: its tokenizer, with a pad token.
        conversations: each the turns so far, ending with the turn to answer.
        sampling: how to decode.
        **extra: more ``generate`` arguments (``adapter_names``, ``streamer``).

    Returns:
        The answers' texts (special tokens removed, stripped), in order.
    """
    prompts = [tokenizer(generation_prompt(tokenizer, turns), add_special_tokens=False)["input_ids"] for turns in conversations]
    batch = collate([{"input_ids": p, "labels": p} for p in prompts], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    output = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            **sampling.generate_kwargs(tokenizer.pad_token_id), **extra)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, batch["input_ids"].shape[1] :]]


class _CallbackStreamer:
    """A ``generate`` streamer that hands each newly decoded piece of the answer to a callback."""

    def __init__(self, tokenizer, callback: Callable[[str], None]) -> None:
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.inner.on_finalized_text = lambda text, stream_end=False: callback(text)

    def put(self, value) -> None:
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def say(speakers: Speakers, conversations: dict[str, Sequence[Turn]], sampling: Sampling, write: Callable[[str], None]) -> dict[str, str]:
    """Every speaker's answer, written out: streamed as it is generated for one speaker, else ``[name] answer`` lines.

    Args:
        speakers: the model and its adapters.
        conversations: speaker name -> the turns so far.
        sampling: how to decode.
        write: where text goes (e.g. ``sys.stdout.write``).

    Returns:
        Speaker name -> answer.
    """
    if len(speakers.names) == 1:
        answers = speakers.answer(conversations, sampling, stream=write)
        write("\n")
        return answers
    answers = speakers.answer(conversations, sampling)
    for name in speakers.names:
        write(f"[{name}] {answers[name]}\n")
    return answers


def chat(speakers: Speakers, lines: Iterable[str], sampling: Sampling, write: Callable[[str], None], system: str | None = None,
         prompt: Callable[[], None] = lambda: None) -> None:
    """A multi-turn conversation read line by line: each speaker keeps its own history (its own answers).

    ``/reset`` forgets the conversation (the system prompt stays), ``/exit`` or the end of `lines` ends it.

    Args:
        speakers: the model and its adapters.
        lines: the user's messages, one per line (e.g. ``sys.stdin``).
        sampling: how to decode.
        write: where answers go.
        system: a system prompt opening every conversation.
        prompt: called before each line is read (e.g. to show a prompt on a terminal).
    """
    opening: list[Turn] = [("system", system)] if system else []
    histories = {name: list(opening) for name in speakers.names}
    prompt()
    for line in lines:
        text = line.strip()
        if text == "/exit":
            return
        if text == "/reset":
            histories = {name: list(opening) for name in speakers.names}
            write("(conversation cleared)\n")
        elif text.startswith("/"):
            write(f"unknown command {text.split()[0]!r}: /reset clears the conversation, /exit leaves.\n")
        elif text:
            for history in histories.values():
                history.append(("user", text))
            answers = say(speakers, histories, sampling, write)
            for name, history in histories.items():
                history.append(("assistant", answers[name]))
        prompt()
