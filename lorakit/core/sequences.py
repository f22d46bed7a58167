"""Sequences computed on demand: a data set bigger than memory is read and tokenized item by item, never whole."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, overload

__all__ = ["MappedSequence", "lazy_map"]

Source = TypeVar("Source")
Result = TypeVar("Result")


class MappedSequence(Sequence[Result], Generic[Source, Result]):
    """``function(source[i])`` for each index, computed when asked for and not kept.

    Args:
        function: turns one source item into one result.
        source: the items (any sequence; e.g. rows of a memory-mapped table).
    """

    def __init__(self, function: Callable[[Source], Result], source: Sequence[Source]) -> None:
        self.function, self.source = function, source

    def __len__(self) -> int:
        return len(self.source)

    @overload
    def __getitem__(self, index: int) -> Result: ...

    @overload
    def __getitem__(self, index: slice) -> list[Result]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.function(self.source[i]) for i in range(*index.indices(len(self)))]
        return self.function(self.source[index])

    def __iter__(self) -> Iterator[Result]:
        return (self.function(item) for item in self.source)


def lazy_map(function: Callable[[Source], Result], source: Sequence[Source]) -> Sequence[Result]:
    """`function` over `source`: a list when `source` is one (it is in memory already), else a `MappedSequence`.

    Args:
        function: turns one item into one result.
        source: the items.

    Returns:
        The results, in order.
    """
    return [function(item) for item in source] if isinstance(source, list) else MappedSequence(function, source)
