"""A bounded pool of reusable host buffers, page-locked on CUDA so copies run asynchronously at full speed."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class Lease:
    """One buffer taken from a pool, viewed as the shape and dtype asked for; give it back with `release`, or use
    it as a context manager. Releasing twice gives it back once."""

    def __init__(self, pool: BufferPool, slot: int, tensor: torch.Tensor) -> None:
        self._pool = pool
        self._slot = slot
        self._released = False
        self._lock = threading.Lock()
        self.tensor = tensor

    def release(self, fence: torch.cuda.Event | None = None) -> None:
        """Returns the buffer; the next user waits for `fence` (the last copy reading or writing it)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._pool._give_back(self._slot, fence)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BufferPool:
    """`slots` host buffers, allocated lazily, grown when a larger batch needs it, and otherwise reused.

    `acquire` blocks while every buffer is leased: that is the engine's backpressure between collate and
    the device. A buffer's memory is never handed out again before the copy that used it has completed.
    """

    def __init__(self, slots: int, *, pin: bool) -> None:
        if slots < 1:
            raise ValueError(f"a buffer pool needs at least one slot, got {slots}")
        self._pin = pin
        self._storage: list[torch.Tensor | None] = [None] * slots
        self._fences: list[torch.cuda.Event | None] = [None] * slots
        self._free = list(range(slots))
        self._cond = threading.Condition()
        self.allocations = 0  # how many buffers were (re)allocated: stays small when buffers are reused

    def acquire(self, shape: Sequence[int], dtype: torch.dtype) -> Lease:
        """Takes a free buffer (blocking until one is) and views it as `shape` and `dtype`."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._cond:
            self._cond.wait_for(lambda: self._free)
            slot = self._free.pop()
        fence = self._fences[slot]
        try:  # the slot goes back whatever fails here: a leaked slot would block every later acquire
            if fence is not None:
                fence.synchronize()  # raises on a device fault: the slot keeps its fence
                self._fences[slot] = fence = None
            storage = self._storage[slot]
            if storage is None or storage.numel() < nbytes:
                self._storage[slot] = None  # an old buffer too small is freed before its successor is allocated
                storage = self._storage[slot] = self._allocate(max(nbytes, 1))
                self.allocations += 1
            return Lease(self, slot, storage[:nbytes].view(dtype).view(tuple(shape)))
        except BaseException:
            self._give_back(slot, fence)
            raise

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def _give_back(self, slot: int, fence: torch.cuda.Event | None) -> None:
        with self._cond:
            self._fences[slot] = fence
            self._free.append(slot)
            self._cond.notify()


class ReleaseAfter:
    """Gives a batch's pinned output buffers back after the last of its `calls` postprocess calls."""

    def __init__(self, calls: int, leases: list[Lease]) -> None:
        self._lock = threading.Lock()
        self._left = calls
        self._leases = leases
        if calls == 0:
            self._release()

    def detach(self, value: Any, arrays: list[np.ndarray]) -> Any:
        """`value` with any array or tensor in it (in dicts, lists and tuples too) that views a pinned buffer,
        about to be reused, replaced by a copy. Other zero-copy wrappers (pyarrow, PIL, memoryview) are the
        postprocess's to avoid: see InferenceTask.postprocess."""
        if not self._leases:
            return value
        if isinstance(value, dict):
            return {k: self.detach(v, arrays) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.detach(v, arrays) for v in value)
        if isinstance(value, np.ndarray) and any(np.may_share_memory(value, a) for a in arrays):
            return value.copy()
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and any(
                np.may_share_memory(value.numpy(), a) for a in arrays):
            return value.clone()
        return value

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._release()

    def _release(self) -> None:
        for lease in self._leases:
            lease.release()
