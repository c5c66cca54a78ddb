"""Batcher: groups ready records into batches, by size, by age, or on request when a bundle drains."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


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

    def add(self, item: T) -> list[T] | None:
        """Adds an item; returns the batch when it has just become full."""
        if not self._items:
            self._opened_at = self._clock()
        self._items.append(item)
        return self.take() if len(self._items) >= self.batch_size else None

    def time_left(self) -> float | None:
        """Seconds until the open batch is due by age; None when no batch is open."""
        if not self._items:
            return None
        return max(0.0, self._opened_at + self.max_wait_s - self._clock())

    def take(self) -> list[T]:
        """Returns the open batch (possibly empty) and starts a new one."""
        items, self._items = self._items, []
        return items
