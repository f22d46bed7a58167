"""LoraHub (arXiv 2307.13269): compose N trained LoRA modules for an unseen task from a few examples.

The composed module is the factor-wise weighted sum (Sec. 3.1), per layer

    A = Σ_i w_i·A_i,   B = Σ_i w_i·B_i     (so B@A = Σ_i Σ_j w_i w_j B_i@A_j: cross terms included)

and w minimises ``few-shot loss + λ·mean|w_i|`` (Sec. 3.2) with a gradient-free optimiser (nevergrad).

Fast evaluation: the examples are tokenised once; a population of P candidates (nevergrad asks P times
before telling) is evaluated in ONE batched forward in which the rows of candidate p use that
candidate's composed factors (P adapters of the model filled in place, then a mixed-adapter batch,
see `LoraModel(..., adapter_names=...)`); causal LMs compute logits only at target positions. Memory:
one set of factors per candidate, never a merged copy of the model.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ...core.errors import LoraConfigError, LoraError
from ...core.examples import (
    IGNORE_INDEX,
    Example,
    collate,
    completion_logprobs,
    right_pad,
    tokenize_example,
)
from ...core.kv_cache import cache_keyword, returned_cache
from ...core.layers import LoraEmbedding
from ...core.lora_model import LoraModel
from ...core.peft_format import (
    SavedAdapter,
    check_adapter_fits,
    factor_keys,
)
from ...core.plotting import pyplot, save_png
from ...core.validation import is_finite_number
from .compose import HubModule, as_module, compose, load_modules
from .settings import DEFAULTS, STARTS

__all__ = ["DEFAULTS", "HubModule", "HubObjective", "HubResult", "as_module", "compose", "learn", "load_modules", "penalised_objective", "plot_result"]

_CANDIDATE = "lorahub_{}"


# -- learning --------------------------------------------------------------------------------------
@dataclass
class HubResult:
    """What `learn` found: the best weights, every evaluation's objective, the composed module, the search time,
    and (with ``merge=True``) the model with the composition folded in."""

    weights: list[float]
    losses: list[float]  # the objective of every evaluation, in order
    module: HubModule
    seconds: float
    model: nn.Module | None = None  # with merge=True: the model with the composed update folded in
    best_losses: list[float] = field(default_factory=list)  # running minimum of `losses`


class HubObjective:
    """The few-shot loss of candidate weight vectors. Wraps `model` with P candidate adapters (unload with
    `close()`, or use it as a context manager: ``with HubObjective(...) as objective:``); `population_loss(W)`
    evaluates the rows of W (P, N) in one batched forward (chunked by `batch_rows`)."""

    def __init__(self, model: nn.Module, modules: list[HubModule], examples: Sequence[Example], tokenizer,
                 population: int = 1, batch_rows: int = 64, max_length: int = 256) -> None:
        if isinstance(model, LoraModel):
            raise LoraConfigError("pass the base model to LoraHub, not a LoraModel: it adds its own candidate adapters.")
        check_adapter_fits(model, SavedAdapter(modules[0].config, modules[0].tensors), modules[0].source)
        self.modules, self.population, self.batch_rows = modules, population, batch_rows
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.items = [self._tokenize(tokenizer, ex, max_length) for ex in examples]  # before the model is wrapped
        self.prefix = 0 if self.seq2seq else _shared_prefix(self.items)  # e.g. the chat template's system turn
        self.shared_ids = self.items[0]["input_ids"][: self.prefix]
        if self.prefix:  # run once per candidate, its keys/values reused by every example
            self.items = [{k: v[self.prefix :] for k, v in item.items()} for item in self.items]
        self.lengths = [len(item["input_ids"]) + len(item["labels"]) * self.seq2seq for item in self.items]
        config = modules[0].config.replace(lora_dropout=0.0, init_lora_weights=True)
        self.modes = [(module, module.training) for module in model.modules()]  # given back by close()
        self.lora = LoraModel(model, config, adapter_name=_CANDIDATE.format(0))
        self.cache_keyword = cache_keyword(model)  # past_key_values or cache, as this transformers names it
        try:
            for p in range(1, population):
                self.lora.add_adapter(_CANDIDATE.format(p), config, initialize=False)
            self.lora.eval()
            self.stacks = self._stack_factors()
        except BaseException:
            self.close()
            raise

    def _stack_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Layer path -> (A (N, r, in), B (N, out, r)) of the modules, on the model's device and dtype."""
        stacks = {}
        for path, layer in self.lora.lora_layers():
            key_A, key_B = factor_keys(path, isinstance(layer, LoraEmbedding))
            like = layer.lora_A[_CANDIDATE.format(0)]
            stacks[path] = tuple(torch.stack([m.tensors[k] for m in self.modules]).to(like.device, like.dtype) for k in (key_A, key_B))
        return stacks

    def _tokenize(self, tokenizer, example: Example, max_length: int) -> dict:
        if not self.seq2seq:
            return tokenize_example(tokenizer, example, max_length=max_length)
        source = tokenizer(example.prompt, truncation=True, max_length=max_length)["input_ids"]
        target = tokenizer(example.target, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": source, "labels": target}

    @torch.no_grad()
    def compose_into(self, weights: Tensor) -> None:
        """Candidate p's adapter := the composition with weights[p] (in place, no state-dict rewrite).

        Args:
            weights: (P, N), one row of module weights per candidate; P is at most the objective's population.
        """
        for path, layer in self.lora.lora_layers():
            A_stack, B_stack = self.stacks[path]
            w = weights.to(A_stack.device, A_stack.dtype)  # (P, N)
            A = torch.einsum("pn,nri->pri", w, A_stack)  # (P, r, in)
            B = torch.einsum("pn,nor->por", w, B_stack)  # (P, out, r)
            for p in range(w.shape[0]):
                layer.lora_A[_CANDIDATE.format(p)].copy_(A[p])
                layer.lora_B[_CANDIDATE.format(p)].copy_(B[p])

    @torch.no_grad()
    def population_loss(self, weights: Tensor) -> list[float]:
        """Mean over examples of each example's mean token cross-entropy, for every row of weights (P, N).

        Args:
            weights: (P, N), one row of module weights per candidate; P is at most the objective's population.

        Returns:
            One loss per candidate (P floats), without the L1 term.

        Raises:
            LoraError: `weights` has more rows than the objective's population.
        """
        if weights.shape[0] > self.population:
            raise LoraError(f"{weights.shape[0]} candidates for an objective built for a population of {self.population}.")
        self.compose_into(weights)
        prefix = self._prefix_cache(weights.shape[0]) if self.prefix else None
        losses = torch.zeros(weights.shape[0], len(self.items))  # (P, E)
        for chunk in self._chunks(weights.shape[0]):
            names = [_CANDIDATE.format(p) for p, _ in chunk]
            cache = None
            if prefix is not None:  # each row continues its own candidate's prefix
                cache = copy.deepcopy(prefix)
                cache.batch_select_indices(torch.tensor([p for p, _ in chunk], device=self._device()))
            values = self._example_losses([self.items[e] for _, e in chunk], names, cache)
            for (p, e), value in zip(chunk, values.tolist()):
                losses[p, e] = value
        return losses.mean(dim=1).tolist()

    def _chunks(self, candidates: int) -> list[list[tuple[int, int]]]:
        """(candidate, example) rows grouped into batches of similar length: rows sorted by token count,
        a batch closes at `batch_rows` rows or when padding would exceed a quarter of its tokens."""
        rows = sorted(((p, e) for p in range(candidates) for e in range(len(self.items))), key=lambda pe: self.lengths[pe[1]])
        chunks, current, real = [], [], 0
        for p, e in rows:
            length = self.lengths[e]
            if current and (len(current) == self.batch_rows or (len(current) + 1) * length > 1.25 * (real + length)):
                chunks.append(current)
                current, real = [], 0
            current.append((p, e))
            real += length
        return chunks + [current] if current else chunks

    def _device(self) -> torch.device:
        return next(self.lora.parameters()).device

    def _forward(self, names: list[str]):
        if len(set(names)) == 1:  # one candidate: the plain (fused) adapter path
            self.lora.set_adapter(names[0])
            return self.lora
        return lambda **inputs: self.lora(**inputs, adapter_names=names)  # each row its candidate's factors

    def _prefix_cache(self, candidates: int):
        """Keys/values of the shared prompt prefix, one row per candidate."""
        ids = torch.tensor([self.shared_ids] * candidates, device=self._device())  # (P, prefix)
        names = [_CANDIDATE.format(p) for p in range(candidates)]
        return returned_cache(self._forward(names)(input_ids=ids, use_cache=True, logits_to_keep=1))

    def _example_losses(self, items: list[dict], names: list[str], cache=None) -> Tensor:
        device, forward = self._device(), self._forward(names)
        if not self.seq2seq:
            batch = {k: v.to(device) for k, v in collate(items, self.pad_id).items()}
            if cache is not None:  # after the cached prefix: mask it in, positions continue from it
                prefix_mask = torch.ones(len(items), self.prefix, dtype=batch["attention_mask"].dtype, device=device)
                batch["attention_mask"] = torch.cat([prefix_mask, batch["attention_mask"]], dim=1)
                batch["position_ids"] = batch["position_ids"] + self.prefix
                batch[self.cache_keyword] = cache
            logprobs, mask = completion_logprobs(forward, batch)
            return -logprobs.sum(-1) / mask.sum(-1)  # (rows,)
        batch = _collate_seq2seq(items, self.pad_id, device)
        labels = batch.pop("labels")
        logits = forward(**batch, labels=labels).logits.float()  # (rows, tgt, vocab)
        token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        mask = labels != IGNORE_INDEX
        return (token_loss * mask).sum(-1) / mask.sum(-1)

    def __enter__(self) -> HubObjective:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> nn.Module:
        """Remove the candidate adapters: the base model as it was (parameters, flags, train/eval modes)."""
        base = self.lora.unload()
        for module, training in self.modes:
            module.training = training
        return base


def _shared_prefix(items: list[dict], minimum: int = 4) -> int:
    """Tokens every example starts with, ending before the first position whose logits are needed
    (0 when fewer than `minimum`: not worth a second forward)."""
    first = items[0]["input_ids"]
    length = min(len(item["input_ids"]) for item in items)
    for item in items:
        common = 0
        while common < length and item["input_ids"][common] == first[common]:
            common += 1
        first_label = next(i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
        length = min(common, first_label - 1)
    return length if length >= minimum else 0


def _collate_seq2seq(items: list[dict], pad_id: int, device) -> dict[str, Tensor]:
    """Right-padded encoder inputs and decoder labels (-100 padding)."""
    ids, mask = right_pad([item["input_ids"] for item in items], pad_id)
    labels, _ = right_pad([item["labels"] for item in items], IGNORE_INDEX)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def default_population(optimizer: str, n_modules: int) -> int:
    """CMA-ES asks a population of ``4 + floor(3 ln N)`` (Hansen's default); other optimisers one at a time."""
    return 4 + int(3 * math.log(n_modules)) if "CMA" in optimizer.upper() else 1


def nevergrad_name(name: str) -> str:
    """The nevergrad registry name for `name` ("CMA-ES" and "CMAES" are nevergrad's "CMA").

    Args:
        name: an optimiser name as a user writes it.

    Returns:
        Its key in ``nevergrad.optimizers.registry``.

    Raises:
        LoraConfigError: nevergrad has no such optimiser.
    """
    import nevergrad as ng

    name = {"CMA-ES": "CMA", "CMAES": "CMA"}.get(name.upper(), name)
    if name not in ng.optimizers.registry:
        raise LoraConfigError(f"{name!r} is not a nevergrad optimiser; try 'NGOpt', 'CMA', 'OnePlusOne' or 'TwoPointsDE'.")
    return name


def make_optimizer(name: str, n_modules: int, budget: int, bounds: tuple[float, float], seed: int, population: int,
                   start: Sequence[float] | None = None):
    """A seeded nevergrad optimiser over w ∈ [lo, hi]^N starting at `start` (None: 0; "CMA-ES" is nevergrad's "CMA")."""
    import nevergrad as ng
    import numpy as np

    name = nevergrad_name(name)
    init = np.zeros(n_modules) if start is None else np.asarray(start, dtype=float)
    parametrization = ng.p.Array(init=init, lower=bounds[0], upper=bounds[1])
    parametrization.random_state = np.random.RandomState(seed)
    return ng.optimizers.registry[name](parametrization=parametrization, budget=budget, num_workers=population)


def learn(model: nn.Module, modules: Sequence, examples: Sequence[Example], tokenizer, *, budget: int = DEFAULTS["budget"],
          lam: float = DEFAULTS["lam"], optimizer: str = DEFAULTS["optimizer"], bounds: tuple[float, float] = DEFAULTS["bounds"],
          seed: int = 0, population: int | None = None, merge: bool = False, batch_rows: int = 64, max_length: int = 256,
          progress: bool = True, start: str = DEFAULTS["start"]) -> HubResult:
    """Find weights w for `modules` minimising the few-shot loss on `examples` + ``lam·mean|w|``.

    Defaults are the paper's code (NGOpt, budget 40, λ = 0.05, w ∈ [-1.5, 1.5] starting at 0). A
    population (default: CMA's own size, else 1) is evaluated in one batched forward. The model comes
    back unchanged, or with the composed update merged when ``merge=True`` (then in ``result.model``).

    ``start="best-single"`` first scores every module alone (the N one-hot weight vectors, in one batched
    forward) and starts the search at the best of them; the result is never worse (in the objective) than that
    module. With 40 evaluations over 20 weights the paper's search from 0 barely leaves its starting simplex:
    on a task whose own module is in the library it found that module but kept 4-15% of its gain, where the
    best-single start kept 96-100% (docs/results.md, "LoraHub study").

    Args:
        model: the base model (not a `LoraModel`): it is wrapped with candidate adapters during the search.
        modules: adapter directories, `HubModule`s or ``(LoraModel, adapter_name)`` pairs sharing targets and
            rank (see `load_modules`).
        examples: a few examples of the new task; the loss is on their targets.
        tokenizer: the model's tokenizer.
        budget: objective evaluations of the search (``start="best-single"`` adds N before it).
        lam: weight λ of the L1 term ``mean|w|``.
        optimizer: a nevergrad optimiser name (``"CMA-ES"`` is nevergrad's ``"CMA"``).
        bounds: ``(low, high)`` of every weight.
        seed: seeds the optimiser.
        population: candidates evaluated per batched forward (None: ``4 + floor(3 ln N)`` for CMA, else 1).
        merge: also return the model with the composed update merged, in ``result.model``.
        batch_rows: the most (candidate, example) rows in one forward.
        max_length: the most tokens of a tokenized example.
        progress: show a progress bar.
        start: ``"zero"`` (the paper: all weights 0) or ``"best-single"`` (the module whose one-hot weights have
            the lowest objective).

    Returns:
        A `HubResult`: the best weights, the objective of every evaluation (and its running minimum), the
        composed module, the seconds the search took and, with ``merge=True``, the merged model.

    Raises:
        LoraConfigError: a setting is out of range, there are no examples, `model` is a `LoraModel`, the optimiser
            or the start is unknown, or the modules do not fit together.
        AdapterLoadError: a module's directory cannot be read, or the modules do not fit `model`.
    """
    if len(examples) == 0:
        raise LoraConfigError("LoraHub needs at least one example of the new task; pass a few (the paper uses 5).")
    check_search_settings(budget, lam, bounds, population, batch_rows, max_length, start)
    modules = load_modules(modules)
    population = population or default_population(optimizer, len(modules))
    nevergrad_name(optimizer)
    scanned = len(modules) if start == "best-single" else 0
    objective = HubObjective(model, modules, examples, tokenizer, max(population, scanned), batch_rows, max_length)
    losses, started = [], time.perf_counter()
    try:
        if scanned:  # each module alone: the rows of the identity, one batched forward
            one_hot = torch.eye(scanned)  # (N, N)
            losses = [penalised_objective(fit, row, lam) for fit, row in zip(objective.population_loss(one_hot), one_hot.tolist())]
            chosen = min(range(scanned), key=losses.__getitem__)
        search = make_optimizer(optimizer, len(modules), budget, bounds, seed, population, one_hot[chosen].tolist() if scanned else None)
        with tqdm(total=budget, desc=f"LoraHub ({optimizer})", disable=not progress) as bar, warnings.catch_warnings():
            # NGOpt's small-budget choice, Cobyla, passes SciPy's COBYLA a stopping radius it then resets: noise
            warnings.filterwarnings("ignore", message=r"COBYLA: Invalid RHO(BEG|END)")
            while len(losses) < scanned + budget:
                candidates = [search.ask() for _ in range(min(population, scanned + budget - len(losses)))]
                weights = torch.tensor([list(c.value) for c in candidates], dtype=torch.float32)  # (P, N)
                fits = objective.population_loss(weights)
                for candidate, fit in zip(candidates, fits):
                    value = penalised_objective(fit, candidate.value, lam)
                    search.tell(candidate, value)
                    losses.append(value)
                bar.update(len(candidates))
                bar.set_postfix(best=f"{min(losses):.4f}")
        best = [float(x) for x in search.provide_recommendation().value]
        if scanned:  # the search's pick, unless it scores worse than the module it started from
            if penalised_objective(objective.population_loss(torch.tensor([best]))[0], best, lam) > losses[chosen]:
                best = one_hot[chosen].tolist()
    finally:
        base = objective.close()
    module = compose(modules, best)
    result = HubResult(best, losses, module, time.perf_counter() - started, best_losses=_running_min(losses))
    if merge:
        from ...core.loading import apply_adapter

        wrapped = LoraModel(base)
        apply_adapter(wrapped, "lorahub", module.config, module.tensors, is_trainable=False)
        wrapped.set_adapter("lorahub")
        result.model = wrapped.merge_and_unload()
    return result


def check_search_settings(budget, lam, bounds, population, batch_rows=64, max_length=256, start="zero") -> None:
    """Every LoraHub search setting, checked before the model is touched (the CLI checks them before loading it).

    Args:
        budget: evaluations of the objective (>= 1).
        lam: weight of the L1 term (finite, >= 0).
        bounds: ``(low, high)`` of every weight, finite, low <= 0 <= high (and high >= 1 for ``start="best-single"``).
        population: candidates per batched evaluation (>= 1), or None.
        batch_rows: rows per forward pass (>= 1).
        max_length: tokens per example (>= 1).
        start: where the search starts, one of `STARTS`.

    Raises:
        LoraConfigError: a setting is out of range.
    """
    for name, value in (("budget", budget), ("batch_rows", batch_rows), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoraConfigError(f"{name}={value!r}: use an integer >= 1.")
    if population is not None and (isinstance(population, bool) or not isinstance(population, int) or population < 1):
        raise LoraConfigError(f"population={population!r}: use an integer >= 1 (or leave it unset).")
    if not is_finite_number(lam) or lam < 0:
        raise LoraConfigError(f"lam={lam!r}: use a finite number >= 0 (the paper's 0.05).")
    if start not in STARTS:
        raise LoraConfigError(f"start={start!r}: use one of {', '.join(STARTS)} ('zero' is the paper's).")
    if len(bounds) != 2 or not all(is_finite_number(b) for b in bounds) or not bounds[0] < bounds[1]:
        raise LoraConfigError(f"bounds={bounds!r}: use two finite numbers (low, high) with low < high, e.g. (-1.5, 1.5).")
    if not bounds[0] <= 0 <= bounds[1]:
        raise LoraConfigError(f"bounds={bounds!r} do not hold 0, where the search starts: use low <= 0 <= high.")
    if start == "best-single" and not bounds[1] >= 1:
        raise LoraConfigError(f"start='best-single' starts at a weight of 1 (the rest 0), above bounds={bounds!r}: use high >= 1, "
                              "or start='zero'.")


def penalised_objective(fit: float, weights: Sequence[float] | Tensor, lam: float) -> float:
    """The objective `learn` minimises: few-shot loss + λ·mean|w| (Sec. 3.2, the L1 term keeps the composition
    near the base model). What `HubResult.losses` records for each evaluation.

    Args:
        fit: the few-shot loss of `weights` (`HubObjective.population_loss` of them).
        weights: the N module weights.
        lam: the L1 coefficient λ (`DEFAULTS["lam"]`, 0.05 as in the paper).

    Returns:
        The penalised objective.

    Example:
        >>> penalised_objective(1.0, [0.5, -1.5], lam=0.05)
        1.05
    """
    return fit + lam * float(np.abs(np.asarray(weights, dtype=float)).mean())


def _running_min(values: list[float]) -> list[float]:
    out, best = [], math.inf
    for value in values:
        best = min(best, value)
        out.append(best)
    return out


def plot_result(result: HubResult, names: Sequence[str], path: str | os.PathLike) -> None:
    """Loss curve (every evaluation and the running best) and the final weights, as a PNG.

    Args:
        result: what `learn` returned.
        names: one label per module, in the order of ``result.weights`` (a path shows as its last part).
        path: where the PNG goes: a file path or a binary file object.
    """
    plt = pyplot()

    figure, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = range(1, len(result.losses) + 1)
    curve.plot(steps, result.losses, ".", alpha=0.5, label="evaluated")
    curve.plot(steps, result.best_losses, "-", label="best so far")
    curve.set(xlabel="evaluation", ylabel="few-shot loss + λ·mean|w|", title="LoraHub search")
    curve.legend()
    bars.bar(range(len(names)), result.weights)
    bars.set_xticks(range(len(names)), [Path(n).name for n in names], rotation=60, ha="right", fontsize=7)
    bars.set(ylabel="weight", title="final weights")
    for axis in (curve, bars):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_png(figure, path, dpi=110)
