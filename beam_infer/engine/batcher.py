"""Batchers: group ready records into batches, by size, by age, or on request when a bundle drains.

`Batcher` keeps arrival order. `LengthBatcher` serves variable-length inputs (token ids, say): it holds a window of
ready records, groups records of similar length, and closes a batch on a record count and a budget of padded
elements (`max_tokens`), so each batch pads to its own longest record, not the longest of whatever came in
together. Both answer the same calls, so the engine's batch thread drives either.
"""

from __future__ import annotations

import bisect
import collections
import itertools
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

    Every batch holds the oldest waiting item, so none waits for ever: it is the oldest with the items just shorter
    than it (the window kept sorted by length), as many as the bounds allow, or, where too few are shorter, the
    shortest items and then longer ones up to the bounds. A batch goes when the window is full, when the oldest
    item is `max_wait_s` old, and (every batch) when a bundle drains. The window stays sorted as items arrive
    (a bisect and a list insert, a memmove of the window), so a batch costs a numpy pass over its neighbours, not a
    sort of the window.
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
        self._sorted: list[tuple[int, int]] = []  # (length, arrival number), ascending
        self._waiting: dict[int, tuple[T, float, int]] = {}  # arrival number -> (item, arrival time, length)
        self._order: collections.deque[int] = collections.deque()  # arrival numbers, oldest first (some gone)
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, item: T) -> list[list[T]]:
        """Adds an item; returns the batch due now (one, when the window has just become full)."""
        number, length = next(self._arrivals), self._length(item)
        self._waiting[number] = (item, self._clock(), length)
        self._order.append(number)
        bisect.insort(self._sorted, (length, number))
        return [self._take_oldest()] if len(self._waiting) >= self.window else []

    def time_left(self) -> float | None:
        oldest = self._oldest()
        if oldest is None:
            return None
        return max(0.0, self._waiting[oldest][1] + self.max_wait_s - self._clock())

    def take_due(self) -> list[list[T]]:
        """The batch that holds the oldest item."""
        return [self._take_oldest()] if self._waiting else []

    def take_all(self) -> list[list[T]]:
        """Every item waiting, in batches cut from the longest down."""
        batches = []
        while self._sorted:
            top = len(self._sorted) - 1
            start = max(0, top + 1 - self._capacity(self._sorted[top][0]))
            batches.append(self._take_span(start, top + 1))
        return batches

    def cost(self, lengths: list[int]) -> int:
        """Padded elements of a batch of items of these lengths."""
        return len(lengths) * padded_length(max(lengths), self.pad_multiple) if lengths else 0

    def _oldest(self) -> int | None:
        while self._order and self._order[0] not in self._waiting:
            self._order.popleft()
        return self._order[0] if self._order else None

    def _take_oldest(self) -> list[T]:
        """The batch of the oldest item: of the full batches of neighbours in length that hold it, the one with the
        least padding per token; where none is full (the oldest is among the shortest), the shortest items and
        then longer ones while they fit."""
        number = self._oldest()
        rank = bisect.bisect_left(self._sorted, (self._waiting[number][2], number))
        lo, hi = max(0, rank - self.batch_size + 1), min(len(self._sorted), rank + self.batch_size)
        lengths = np.fromiter((n for n, _ in self._sorted[lo:hi]), dtype=np.int64, count=hi - lo)
        tops = np.arange(rank - lo, hi - lo)  # each candidate's longest item, by index in `lengths`
        widths = self._padded(lengths[tops])
        counts = np.minimum(self.batch_size, self.max_tokens // widths) if self.max_tokens else np.full(
            len(tops), self.batch_size)
        counts = np.maximum(counts, 1)
        starts = tops - counts + 1
        full = (starts >= 0) & (starts <= rank - lo)
        if full.any():
            prefix = np.concatenate(([0], np.cumsum(lengths)))
            real = prefix[tops + 1] - prefix[np.maximum(starts, 0)]
            padding = np.where(full, counts * widths / np.maximum(real, 1), np.inf)
            best = int(np.argmin(padding))
            return self._take_span(lo + int(starts[best]), lo + int(tops[best]) + 1)
        stop = rank + 1  # near the short end: the shortest items, the oldest among them, then longer while they fit
        while stop < len(self._sorted) and stop < self._capacity(self._sorted[stop][0]):
            stop += 1
        return self._take_span(0, stop)

    def _padded(self, lengths: np.ndarray) -> np.ndarray:
        return np.maximum(self.pad_multiple, -(-lengths // self.pad_multiple) * self.pad_multiple)

    def _take_span(self, start: int, stop: int) -> list[T]:
        span = self._sorted[start:stop]
        del self._sorted[start:stop]
        return [self._waiting.pop(number)[0] for _, number in reversed(span)]  # longest first

    def _capacity(self, longest: int) -> int:
        """Items a batch whose longest item has this length may hold."""
        if not self.max_tokens:
            return self.batch_size
        return max(1, min(self.batch_size, self.max_tokens // padded_length(longest, self.pad_multiple)))
