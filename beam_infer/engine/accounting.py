"""Counting across the engine's threads without a lock on the per-record path: busy time, batch sizes, tallies."""

from __future__ import annotations

import queue
import threading

_COUNT = "#"  # marks a count among a thread's totals (stage names never start with it)


class Stats:
    """Host seconds per stage (summed over threads), event counts (remote retries, say) and batch sizes, added by
    the stage threads and taken, as they stand, by whichever bundle finishes next: summed over bundles they give
    the engine's totals.

    Each thread adds to running totals of its own (no lock on the per-record path); `take` hands out what the
    totals grew by since the last take.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # registering a thread's totals, and take()
        self._local = threading.local()
        self._totals: list[dict[str, float]] = []  # one per thread; only that thread writes it
        self._taken: dict[str, float] = {}
        self._batch_sizes: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.batch_size_counts: dict[int, int] = {}  # every batch run so far: size -> batches (the unload thread's)

    def busy(self, stage: str, seconds: float) -> None:
        totals = self._thread_totals()
        totals[stage] = totals.get(stage, 0.0) + seconds

    def count(self, name: str, n: int = 1) -> None:
        totals = self._thread_totals()
        key = _COUNT + name
        totals[key] = totals.get(key, 0) + n

    def _thread_totals(self) -> dict[str, float]:
        totals = getattr(self._local, "totals", None)
        if totals is None:
            totals = self._local.totals = {}
            with self._lock:
                self._totals.append(totals)
        return totals

    def batch(self, size: int) -> None:
        self._batch_sizes.put(size)
        self.batch_size_counts[size] = self.batch_size_counts.get(size, 0) + 1

    def totals(self) -> dict[str, float]:
        """Busy seconds per stage since the engine started (a telemetry sample; `take` is not affected)."""
        with self._lock:
            return self._sum()

    def _sum(self, counts: bool = False) -> dict[str, float]:
        """The threads' totals summed; event counts too when `counts`. Called with the lock held."""
        now: dict[str, float] = {}
        for totals in self._totals:
            for stage, seconds in list(totals.items()):  # one C call: a consistent snapshot under the GIL
                now[stage] = now.get(stage, 0.0) + seconds
        return now if counts else {k: v for k, v in now.items() if not k.startswith(_COUNT)}

    def take(self) -> tuple[dict[str, float], list[int], dict[str, int]]:
        """(busy seconds per stage, batch sizes, counts per name) since the last take."""
        with self._lock:
            now = self._sum(counts=True)
            busy = {stage: seconds - self._taken.get(stage, 0.0) for stage, seconds in now.items()}
            self._taken = now
        sizes = []
        while not self._batch_sizes.empty():
            sizes.append(self._batch_sizes.get())
        seconds = {stage: value for stage, value in busy.items() if value > 0 and not stage.startswith(_COUNT)}
        counts = {key[len(_COUNT):]: int(value) for key, value in busy.items() if value > 0 and key.startswith(_COUNT)}
        return seconds, sizes, counts


class Tally:
    """A count that many threads add to without a lock: each thread adds to a cell of its own, `value` sums them.
    A contended lock per record costs more than the rest of the record's bookkeeping."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._cells: list[list[int]] = []
        self._lock = threading.Lock()  # only for a thread's first add

    def add(self) -> None:
        cell = getattr(self._local, "cell", None)
        if cell is None:
            cell = self._local.cell = [0]
            with self._lock:
                self._cells.append(cell)
        cell[0] += 1  # only this thread writes its cell

    @property
    def value(self) -> int:
        return sum(cell[0] for cell in list(self._cells))
