"""Calling a batch function (the model, a device preprocess) on row ranges: bisection down to the records that
fail, and halving after CUDA out-of-memory errors, remembered as a most-rows-per-call limit per stage."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from beam_infer.engine.errors import Owner, is_out_of_memory, owner_of
from beam_infer.engine.results import Failure

_LOG = logging.getLogger(__name__)

Chunk = tuple[int, int, tuple[torch.Tensor, ...]]  # rows [start, stop) and the outputs for them


class RowLimits:
    """The most rows per call for each stage, lowered by CUDA out-of-memory errors; none at first."""

    def __init__(self) -> None:
        self._limits: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, stage: str) -> int | None:
        return self._limits.get(stage)

    def lower(self, stage: str, rows_that_failed: int) -> None:
        """After `rows_that_failed` rows ran out of memory and their halves did not: at most half as many."""
        limit = max(1, rows_that_failed // 2)
        with self._lock:
            if limit >= self._limits.get(stage, rows_that_failed + 1):
                return
            self._limits[stage] = limit
        _LOG.warning("beam_infer: CUDA out of memory in %s at %d rows; from now on at most %d rows per call",
                     stage, rows_that_failed, limit)


def call_in_chunks(fn: Callable[[Any], Any], x: Any, rows: int, stage: str,
                   limits: RowLimits) -> tuple[list[Chunk], list[tuple[int, Failure]]]:
    """Runs `fn` over rows [0, rows) of `x` (a batch tensor or a list) in calls no larger than the stage's limit.

    Returns:
        (the chunks that succeeded, in row order; (row, failure) for each record that failed on its own)

    Raises:
        Whatever `fn` raised that is not one record's failure (a device fault, a BaseException): no bisection.
    """
    chunks: list[Chunk] = []
    failures: list[tuple[int, Failure]] = []
    step = limits.get(stage) or rows
    for lo in range(0, rows, step):
        _bisect(fn, x, lo, min(lo + step, rows), stage, limits, chunks, failures)
    return chunks, failures


def _bisect(fn: Callable[[Any], Any], x: Any, start: int, stop: int, stage: str, limits: RowLimits,
            chunks: list[Chunk], failures: list[tuple[int, Failure]]) -> bool:
    """Runs `fn` on rows [start, stop); on a record-level error, bisects down to the records that cause it, so
    the others go on (halving is also the answer to a CUDA out-of-memory error).

    Returns:
        Whether the call on [start, stop) itself ran out of memory.
    """
    try:
        outs = fn(x[start:stop])
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        for out in outs:
            if not isinstance(out, torch.Tensor) or out.shape[:1] != (stop - start,):
                raise ValueError(f"{stage} must return tensors with the batch ({stop - start}) as their "
                                 f"first dimension, got {getattr(out, 'shape', type(out).__name__)}")
        chunks.append((start, stop, outs))
        return False
    except BaseException as e:  # noqa: BLE001 - the classifier decides; only a record's error is bisected
        if owner_of(e, Owner.RECORD) is not Owner.RECORD:
            raise
        failure, out_of_memory = Failure.of(stage, e), is_out_of_memory(e)
    # Out of the except clause: its traceback no longer holds the failed call's frames, so the memory of their
    # tensors is free again for the halves (PyTorch's FAQ on recovering from out-of-memory errors).
    if out_of_memory:
        torch.cuda.empty_cache()
    if stop - start == 1:
        failures.append((start, failure))
        return out_of_memory
    mid = (start + stop) // 2
    halves_ran_out = _bisect(fn, x, start, mid, stage, limits, chunks, failures)
    halves_ran_out |= _bisect(fn, x, mid, stop, stage, limits, chunks, failures)
    # Both halves fit (whatever else failed in them): the size ran out of memory, not a record, so later calls go
    # smaller. A half that ran out too has decided for itself, so a record too large even alone sets no limit;
    # one that fits alone but not beside others does set one (nothing tells it from a batch that is too large).
    if out_of_memory and not halves_ran_out:
        limits.lower(stage, stop - start)
    return out_of_memory
