"""Who owns a failure: the one classifier every stage of the engine asks, and what a fatal error does.

    RECORD  that record's dead letter; the rest go on
    BATCH   that batch's records fail (an out-of-memory error is halved first); the engine goes on
    RUN     the engine's run fails: its waiting bundles raise EngineError, the next bundle gets a fresh run
    FATAL   a sticky device fault: the bundles fail and the worker process exits non-zero, so the runner
            replaces it and retries its bundles on a healthy worker
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Iterator

import torch

FATAL_EXIT_CODE = 70  # EX_SOFTWARE (sysexits.h): what the worker process exits with after a device fault

# How torch's CUDA checks word a CUDA error (C10_CUDA_CHECK); before torch.AcceleratorError (2.8) they were plain
# RuntimeErrors, and some libraries still re-raise them that way. Out-of-memory errors are told apart first.
_CUDA_ERROR_MESSAGE = "cuda error:"
_ACCELERATOR_ERROR: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)


class Owner(enum.Enum):
    RECORD = "record"
    BATCH = "batch"
    RUN = "run"
    FATAL = "fatal"


class EngineError(RuntimeError):
    """An engine thread failed outside any one record's handling; the bundles waiting on it cannot finish."""


class EngineStateError(RuntimeError):
    """The engine's state can no longer be trusted (a stage thread that would not stop): as fatal as a device fault."""


class EngineFatalError(EngineError):
    """A device fault (an illegal address, a device-side assert): this worker process cannot use its device any
    more and exits; the runner retries its bundles on another worker."""


def owner_of(error: BaseException, scope: Owner) -> Owner:
    """Who `error` belongs to, raised by code whose own failures belong to `scope`.

    Args:
        error: what was raised.
        scope: RECORD inside one record's handling (fetch, preprocess, postprocess, a bisected model call on one
            row), BATCH inside a batch's (collate, a copy), RUN in a stage thread's own logic.

    Returns:
        FATAL for a sticky device fault wherever it is raised, and for an EngineStateError; RUN for a
        BaseException that is not an Exception (asyncio.CancelledError, KeyboardInterrupt, SystemExit: no record
        or batch explains them); else `scope`.
    """
    if is_device_fault(error) or isinstance(error, EngineStateError):
        return Owner.FATAL
    if not isinstance(error, Exception):
        return Owner.RUN
    return scope


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, also as torchvision's nvJPEG reports it (a RuntimeError with the message).
    Not sticky: freeing memory and trying fewer rows may succeed."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def is_device_fault(error: BaseException) -> bool:
    """A CUDA error other than out-of-memory, in `error` or the errors it was raised from (its __cause__, and its
    __context__ unless `raise … from None` suppressed it: an error a handler turned into its own is not the device's).

    Such errors are sticky (every later CUDA call of the process fails) and asynchronous (they surface at a later
    synchronisation, often in another batch), so no record or batch can be blamed and bisection would only
    dead-letter innocent records.
    """
    for e in _chain(error):
        if is_out_of_memory(e):
            return False
        if isinstance(e, _ACCELERATOR_ERROR):
            return True
        if isinstance(e, RuntimeError) and _CUDA_ERROR_MESSAGE in str(e).lower():
            return True
    return False


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)


def exit_process(code: int, message: str) -> None:
    """Ends the worker process at once, as a crashed SDK harness would, with `message` written to stderr first.

    os._exit, not sys.exit: this runs on an engine thread, and threads blocked on a broken device must not hold
    the exit up. stderr directly, besides the logs: a runner's log handler (Beam's FnApiLogRecordHandler) may
    ship records from a thread that the exit ends. Tests replace this function.
    """
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)
