"""Batchers: group ready records into batches, by size, by age, or on request when a bundle drains.

`Batcher` keeps arrival order. `LengthBatcher` serves variable-length inputs (token ids, say): it holds a window of
ready records, groups records of similar length, and closes a batch on a record count and a budget of padded
elements (`max_tokens`), so each batch pads to its own longest record, not the longest of whatever came in
together. Both answer the same calls, so the engine's batch thread drives either.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (at least one multiple: an empty row still takes a slot)."""
    return max(multiple, -(-length // multiple) * multiple)


class Batcher(Generic[T]):
    """Collects items; a batch is due when it holds `batch_size` items or its oldest item is `max_wait_s` old.

    The engine also takes a partial batch early when a bundle is draining and nothing more is on its way.
    """

    def __init__(self, batch_size: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._opened_at = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> list[list[T]]:
        """Adds an item; returns the batches due now (the open one, when it has just become full)."""
        if not self._items:
            self._opened_at = self._clock()
        self._items.append(item)
        return self.take_all() if len(self._items) >= self.batch_size else []

    def time_left(self) -> float | None:
        """Seconds until a batch is due by age; None when no item waits."""
        if not self._items:
            return None
        return max(0.0, self._opened_at + self.max_wait_s - self._clock())

    def take_due(self) -> list[list[T]]:
        """The batch that holds the oldest item (called once it is due by age)."""
        return self.take_all()

    def take_all(self) -> list[list[T]]:
        """Every item waiting, in batches (none when nothing waits)."""
        items, self._items = self._items, []
        return [items] if items else []


class LengthBatcher(Generic[T]):
    """Batches items of similar length from a window of up to `window` waiting items.

    A batch holds at most `batch_size` items and, with `max_tokens`, at most `max_tokens` padded elements: its
    item count times its longest length rounded up to `pad_multiple` (one item longer than the budget goes alone).
    Grouping sorts the window by length and cuts it, longest first, into batches that fill those bounds.

    When the window is full, the full batch that holds the oldest item goes (the first full one when the oldest is
    in the partial remainder), so the window keeps most of its choice; when the oldest item is `max_wait_s` old,
    the batch that holds it goes, full or not; a draining bundle takes every batch. Grouping costs a sort of the
    window per batch (numpy's), a few microseconds per item.
    """

    def __init__(self, batch_size: int, max_wait_s: float, length: Callable[[T], int], *, window: int,
                 max_tokens: int = 0, pad_multiple: int = 8, clock: Callable[[], float] = time.monotonic) -> None:
        if batch_size < 1 or window < 1 or pad_multiple < 1 or max_tokens < 0:
            raise ValueError(f"batch_size, window and pad_multiple must be at least 1 and max_tokens not negative, "
                             f"got {batch_size}, {window}, {pad_multiple} and {max_tokens}")
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.window = max(window, batch_size)
        self.max_tokens = max_tokens
        self.pad_multiple = pad_multiple
        self._length = length
        self._clock = clock
        self._items: list[T] = []  # oldest first
        self._lengths: list[int] = []
        self._arrivals: list[float] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> list[list[T]]:
        """Adds an item; returns the batch due now (one, when the window has just become full)."""
        self._items.append(item)
        self._lengths.append(self._length(item))
        self._arrivals.append(self._clock())
        return [self._take(self._choose())] if len(self._items) >= self.window else []

    def time_left(self) -> float | None:
        if not self._items:
            return None
        return max(0.0, self._arrivals[0] + self.max_wait_s - self._clock())

    def take_due(self) -> list[list[T]]:
        """The batch that holds the oldest item: full where the window allows, else whatever is around it."""
        return [self._take(self._choose())] if self._items else []

    def take_all(self) -> list[list[T]]:
        """Every item waiting, grouped by length."""
        lengths = np.asarray(self._lengths)
        groups = [_pick(self._items, g.tolist()) for g in self._cut(np.argsort(-lengths, kind="stable"), lengths)]
        self._items, self._lengths, self._arrivals = [], [], []
        return groups

    def cost(self, lengths: list[int]) -> int:
        """Padded elements of a batch of items of these lengths."""
        return len(lengths) * padded_length(max(lengths), self.pad_multiple) if lengths else 0

    def _choose(self) -> np.ndarray:
        """The next batch: the full batch that holds the oldest item, cut from the long end of the window sorted
        by length or, where the oldest falls in the long end's partial remainder, from the short end; else (the
        window holds less than a batch around the oldest) the first full batch when the window is full, or the
        oldest's partial one."""
        lengths = np.asarray(self._lengths)
        longest_first = np.argsort(-lengths, kind="stable")  # the oldest first among equal lengths
        groups = self._cut(longest_first, lengths)
        oldest = next(g for g in groups if 0 in g)
        if self._is_full(oldest, lengths):
            return oldest
        shortest_first = np.argsort(lengths, kind="stable")
        for group in self._cut(shortest_first, lengths, growing=True):
            if 0 in group:
                if self._is_full(group, lengths):
                    return group
                break
        if len(self._items) >= self.window:
            return next((g for g in groups if self._is_full(g, lengths)), oldest)
        return oldest

    def _cut(self, order: np.ndarray, lengths: np.ndarray, growing: bool = False) -> list[np.ndarray]:
        """`order` cut into consecutive batches, each as large as the bounds allow. Longest first, the first item
        sets the width; shortest first (`growing`), each next item widens the batch."""
        groups, start, n = [], 0, len(order)
        while start < n:
            if not growing:
                stop = start + self._capacity(int(lengths[order[start]]))
            else:
                span = order[start:start + self.batch_size]
                size = np.arange(1, len(span) + 1)
                fits = (size * self._padded(lengths[span]) <= self.max_tokens) if self.max_tokens else size > 0
                fits[0] = True  # one item longer than the budget goes alone
                stop = start + (int(np.argmin(fits)) if not fits.all() else len(span))
            groups.append(order[start:stop])
            start = stop
        return groups

    def _padded(self, lengths: np.ndarray) -> np.ndarray:
        return np.maximum(self.pad_multiple, -(-lengths // self.pad_multiple) * self.pad_multiple)

    def _capacity(self, longest: int) -> int:
        """Items a batch whose longest item has this length may hold."""
        if not self.max_tokens:
            return self.batch_size
        return max(1, min(self.batch_size, self.max_tokens // padded_length(longest, self.pad_multiple)))

    def _is_full(self, group: np.ndarray, lengths: np.ndarray) -> bool:
        """Whether no other item could join the group (one as long as its longest)."""
        return len(group) >= self._capacity(int(lengths[group].max()))

    def _take(self, group: np.ndarray) -> list[T]:
        batch = _pick(self._items, group.tolist())
        keep = np.ones(len(self._items), dtype=bool)
        keep[group] = False
        rest = np.flatnonzero(keep).tolist()
        self._items, self._lengths, self._arrivals = (_pick(x, rest) for x in (self._items, self._lengths,
                                                                                self._arrivals))
        return batch


def _pick(values: list, indices: list[int]) -> list:
    """values[i] for each of `indices`, at C speed (operator.itemgetter)."""
    if len(indices) < 2:
        return [values[i] for i in indices]
    return list(operator.itemgetter(*indices)(values))
