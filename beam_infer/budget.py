"""FailureBudget: the job fails, naming the budget and the first errors, when too many records failed.

Failed records are data (dead-letter rows) up to a budget; past it, something is wrong with the input or the
model as a whole and the job should stop with a clear message instead of writing mostly dead letters.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.pvalue import AsSingleton

_SHOWN_ERRORS = 5  # dead letters quoted in the failure message: the smallest ids, so the message is stable


class FailureBudgetExceeded(RuntimeError):
    """More records failed than the job's failure budget allows."""


@dataclass(frozen=True)
class Budget:
    """At most `max_dead_letters` failed records, and at most `max_fraction` of all records (None: no limit)."""

    max_dead_letters: int | None = None
    max_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.max_dead_letters is not None and self.max_dead_letters < 0:
            raise ValueError(f"max_dead_letters must be 0 or more, got {self.max_dead_letters}")
        if self.max_fraction is not None and not 0 <= self.max_fraction <= 1:
            raise ValueError(f"max_fraction must be between 0 and 1, got {self.max_fraction}")

    @property
    def unlimited(self) -> bool:
        return self.max_dead_letters is None and self.max_fraction is None

    def check(self, dead: int, records: int, first: list[dict]) -> None:
        """Raises FailureBudgetExceeded when `dead` of `records` is past the budget."""
        over = []
        if self.max_dead_letters is not None and dead > self.max_dead_letters:
            over.append(f"at most {self.max_dead_letters} dead letters")
        if self.max_fraction is not None and records and dead / records > self.max_fraction:
            over.append(f"at most {self.max_fraction:.2%} of the records")
        if over:
            raise FailureBudgetExceeded(
                f"failure budget exceeded: {dead} of {records} records failed; the budget allows "
                f"{' and '.join(over)}. First errors (by id):\n{_quote(first)}")


def _quote(dead_letters: list[dict]) -> str:
    return "\n".join(f"  {d.get('id')} ({d.get('uri')}): {d.get('stage')}: {d.get('error_type')}: {d.get('message')}"
                     for d in dead_letters)


_COUNTED: dict[str, tuple[int, list[dict]]] = {}  # per process, per early check: (dead letters, the first ones)
_COUNTED_LOCK = threading.Lock()


class _StopEarly(beam.DoFn):
    """Counts the dead letters this worker process emits; once they alone pass max_dead_letters the job cannot
    end within its budget, so it fails now rather than after every record (a bundle retried after a failure
    counts again: the check may stop a job that ends a few dead letters short of its budget)."""

    def __init__(self, max_dead_letters: int) -> None:
        self._max = max_dead_letters
        self._key = uuid.uuid4().hex  # one count per pipeline, whatever else runs in the process

    def process(self, dead_letter: dict) -> None:
        with _COUNTED_LOCK:
            count, first = _COUNTED.get(self._key, (0, []))
            count += 1
            first = first if len(first) >= _SHOWN_ERRORS else [*first, dead_letter]
            _COUNTED[self._key] = (count, first)
        if count > self._max:
            raise FailureBudgetExceeded(
                f"failure budget exceeded: at least {count} records failed (counted in one worker, before the end "
                f"of the job); the budget allows at most {self._max} dead letters. First errors seen:\n"
                f"{_quote(first)}")


def _check(_, budget: Budget, dead: int, predictions: int, first: list[dict]) -> None:
    budget.check(dead, dead + predictions, first)


class FailureBudget(beam.PTransform):
    """Fails the job when the dead letters pass `budget`; takes (predictions, dead_letters) PCollections.

    With `max_dead_letters`, each worker process fails the job as soon as the dead letters it emitted pass it.
    The whole check (both limits, quoting the smallest ids) runs once every record is counted, that is, when a
    batch job's inference is done.
    """

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self._budget = budget

    def expand(self, outputs: tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        predictions, dead_letters = outputs
        if self._budget.max_dead_letters is not None:
            dead_letters | "StopEarly" >> beam.ParDo(_StopEarly(self._budget.max_dead_letters))
        dead = dead_letters | "CountDead" >> beam.combiners.Count.Globally()
        done = predictions | "CountPredictions" >> beam.combiners.Count.Globally()
        first = dead_letters | "FirstErrors" >> beam.combiners.Top.Smallest(_SHOWN_ERRORS, key=lambda d: d["id"])
        return (predictions.pipeline
                | "Once" >> beam.Create([None])
                | "Check" >> beam.Map(_check, self._budget, AsSingleton(dead), AsSingleton(done),
                                      AsSingleton(first)))
