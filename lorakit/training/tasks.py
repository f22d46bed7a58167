"""What a run learns (``model.task``): completions of a causal LM, or classes of a sequence classifier.

Each task turns examples into training items, names its training objective, and scores a model on test and
validation examples, so the recipe runs either the same way. A classification run reads the same data as a
multiple-choice one: the classes are the options (in sorted order, the same for every example), an
example's class is its right option, and the text classified is its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import DataError
from ..core.examples import Example, conversation, tokenize_example
from ..core.sequences import lazy_map
from . import evaluate
from .objectives import ClassificationObjective, CompletionObjective

__all__ = ["ClassificationTask", "CompletionTask", "task_for"]


@dataclass(frozen=True)
class CompletionTask:
    """A causal LM trained on completions, scored by option likelihood or exact match (`evaluate.evaluate`).

    Attributes:
        train_on: which assistant turns of chat examples carry the loss (``data.train_on``; see
            `lorakit.core.chat.conversation_segments`).
    """

    train_on: str = "all_assistant"
    model_task = "causal-lm"
    num_labels = None
    loss_unit = "completion token"

    def items(self, tokenizer, examples: Sequence[Example], max_length: int) -> Sequence[dict]:
        """Tokenized items {input_ids, labels} (the loss on the completion, or a conversation's trained turns, only).

        Args:
            tokenizer: the model's tokenizer.
            examples: the examples.
            max_length: the most tokens per item.

        Returns:
            One item per example (a list for examples in memory, tokenized on demand for a `TableExamples` view).
        """
        return lazy_map(lambda ex: tokenize_example(tokenizer, ex, max_length=max_length, train_on=self.train_on), examples)

    def objective(self, pad_id: int) -> CompletionObjective:
        """The training objective.

        Args:
            pad_id: the padding token id.

        Returns:
            A `CompletionObjective`.
        """
        return CompletionObjective(pad_id)

    def evaluate(self, model, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int = 512) -> dict[str, float]:
        """Test accuracy (see `evaluate.evaluate`).

        Args:
            model: the model.
            tokenizer: its tokenizer.
            examples: the test examples.
            batch_size: examples per forward.
            max_length: unused (prompts keep their last 512 tokens, as `evaluate.evaluate` does).

        Returns:
            ``{"accuracy", "majority", "items"}``.
        """
        return evaluate.evaluate(model, tokenizer, examples, batch_size)

    def sample_answers(self, model, tokenizer, examples: Sequence[Example]) -> list[str]:
        """What the model answers to `examples` in free generation (greedy, at most 48 tokens), for the summary.

        Args:
            model: the model.
            tokenizer: its tokenizer.
            examples: a few test examples.

        Returns:
            One answer per example.
        """
        from .generation import Sampling, generate_answers

        with evaluate.eval_mode(model):
            return generate_answers(model, tokenizer, [conversation(ex)[:-1] for ex in examples], Sampling(max_new_tokens=48))

    def validation_loss(self, model, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int) -> float:
        """Mean cross-entropy per completion token (see `evaluate.token_loss`).

        Args:
            model: the model.
            tokenizer: its tokenizer.
            examples: the validation examples.
            batch_size: examples per forward.
            max_length: the most tokens per example.

        Returns:
            The loss in nats.
        """
        return evaluate.token_loss(model, tokenizer, examples, batch_size, max_length, self.train_on)


@dataclass(frozen=True)
class ClassificationTask:
    """A sequence classifier over fixed classes: the options of the data.

    Attributes:
        classes: the class names, sorted; class id i is ``classes[i]``.
    """

    classes: tuple[str, ...]
    model_task = "classification"
    loss_unit = "item"

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> ClassificationTask:
        """The classes of multiple-choice examples.

        Args:
            examples: every example of the data (each with options and the index of its right one).

        Returns:
            The task.

        Raises:
            DataError: an example has no options, or fewer than two classes are found.
        """
        for row, ex in enumerate(examples):
            if not ex.options or ex.label is None:
                raise DataError(f"row {row} has no options and label: a classification run needs multiple-choice data "
                                "(BIG-bench tasks with target_scores, or rows with 'options' and 'label').")
        classes = tuple(sorted({option for ex in examples for option in ex.options}))
        if len(classes) < 2:
            raise DataError(f"the data has {len(classes)} class(es) {list(classes)}: a classifier needs at least two.")
        return cls(classes)

    @property
    def num_labels(self) -> int:
        """The number of classes."""
        return len(self.classes)

    def label_of(self, example: Example) -> int:
        """The class id of `example`'s right option.

        Args:
            example: a multiple-choice example.

        Returns:
            Its class id.
        """
        return self.classes.index(example.options[example.label])

    def items(self, tokenizer, examples: Sequence[Example], max_length: int) -> Sequence[dict]:
        """Tokenized items {input_ids, label}: the prompt (truncated to `max_length` tokens) and its class id.

        Args:
            tokenizer: the classifier's tokenizer.
            examples: the examples.
            max_length: the most tokens per item.

        Returns:
            One item per example (a list for examples in memory, tokenized on demand for a `TableExamples` view).
        """
        return lazy_map(lambda ex: {"input_ids": tokenizer(ex.prompt, truncation=True, max_length=max_length)["input_ids"],
                                    "label": self.label_of(ex)}, examples)

    def objective(self, pad_id: int) -> ClassificationObjective:
        """The training objective.

        Args:
            pad_id: the padding token id.

        Returns:
            A `ClassificationObjective`.
        """
        return ClassificationObjective(pad_id)

    def evaluate(self, model, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int = 512) -> dict[str, float]:
        """Test accuracy of the arg-max class.

        Args:
            model: the classifier.
            tokenizer: its tokenizer.
            examples: the test examples.
            batch_size: items per forward.
            max_length: the most tokens per item.

        Returns:
            ``{"accuracy", "majority", "items"}``.
        """
        items = self.items(tokenizer, examples, max_length)
        accuracy = evaluate.classification_accuracy(model, items, tokenizer.pad_token_id, batch_size)
        return {"accuracy": accuracy, "majority": evaluate.majority_rate(examples), "items": len(examples)}

    @torch.no_grad()
    def sample_answers(self, model, tokenizer, examples: Sequence[Example], max_length: int = 512) -> list[str]:
        """The class the model predicts for each of `examples`, for the summary.

        Args:
            model: the classifier.
            tokenizer: its tokenizer.
            examples: a few test examples.
            max_length: the most tokens per item.

        Returns:
            One class name per example.
        """
        from ..core.examples import collate_classification

        batch = collate_classification(list(self.items(tokenizer, examples, max_length)), tokenizer.pad_token_id)
        device = next(model.parameters()).device
        with evaluate.eval_mode(model):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        return [self.classes[int(k)] for k in logits.argmax(-1)]

    @torch.no_grad()
    def validation_loss(self, model, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int) -> float:
        """Mean cross-entropy per item, in eval mode.

        Args:
            model: the classifier.
            tokenizer: its tokenizer.
            examples: the validation examples.
            batch_size: items per forward.
            max_length: the most tokens per item.

        Returns:
            The loss in nats.
        """
        items, objective = self.items(tokenizer, examples, max_length), self.objective(tokenizer.pad_token_id)
        device, total = next(model.parameters()).device, 0.0
        with evaluate.eval_mode(model):
            for indices in evaluate.length_batches([len(item["input_ids"]) for item in items], batch_size):
                total += objective.loss_sum(model, [items[i] for i in indices], device)[0].item()
        return total / len(items)


def task_for(model_task: str, examples: Sequence[Example], train_on: str = "all_assistant") -> CompletionTask | ClassificationTask:
    """The task a run's ``model.task`` names.

    Args:
        model_task: ``"causal-lm"`` or ``"classification"``.
        examples: all the run's examples (the classes of a classification run come from them).
        train_on: a causal LM's ``data.train_on``.

    Returns:
        A `CompletionTask` or a `ClassificationTask`.

    Raises:
        DataError: a classification run on data without options.
    """
    return ClassificationTask.from_examples(examples) if model_task == "classification" else CompletionTask(train_on)
