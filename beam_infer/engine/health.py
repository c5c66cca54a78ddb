"""The health of engine runs: the error that ended a run, the bundles waiting on it, and, after a device fault,
the process-wide verdict: every run of the process fails, and the worker process exits once their bundles have."""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable

from beam_infer.engine import errors
from beam_infer.engine.errors import EngineError, EngineFatalError, Owner, owner_of

_LOG = logging.getLogger(__name__)
_FATAL_GRACE_S = 5.0  # after a device fault, the longest the process waits for its open bundles to raise
_FATAL_REPORT_S = 2.0  # then, the longest it gives the harness to report them (it asks for a bundle only after)
WAKE = object()  # put in a bundle's result queue when the run fails, so that a waiting drain looks at once


class RunHealth:
    """Whether a run failed (`error`) or was stopped, and the result queues of the bundles open on it.

    Args:
        name: how errors name the engine ("beam_infer engine for <task> on <device>").
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopped = False
        self._error: EngineError | None = None  # set by the first failure no record or batch owns
        self._lock = threading.Lock()
        self._open: dict[int, queue.SimpleQueue] = {}
        self._no_open_bundle = threading.Event()
        self._no_open_bundle.set()
        _PROCESS.add(self)

    @property
    def error(self) -> EngineError | None:
        """The run's error; after a device fault anywhere in the process, that fault's."""
        fault = _PROCESS.error
        return fault if fault is not None else self._error

    def fail(self, error: BaseException, where: str) -> None:
        """Ends the run with `error`, raised in `where`: the bundles open on it raise EngineError from their next
        call. A device fault ends every run of the process, and the process (see _ProcessHealth.fault)."""
        if owner_of(error, Owner.RUN) is Owner.FATAL:
            _PROCESS.fault(self, error, where)
            return
        failed = EngineError(f"{self.name} failed in {where}: {error!r}. The bundles waiting on it fail (the "
                             f"runner retries them); the next bundle gets a fresh run of the engine.")
        failed.__cause__ = error
        if self.mark(failed):
            _LOG.error("%s", failed, exc_info=error)
        else:
            _LOG.warning("beam_infer: after the engine run failed, also in %s: %r", where, error)

    def mark(self, failed: EngineError) -> bool:
        """Sets the run's error (a fatal one replaces an earlier one) and wakes its bundles; False if it had one."""
        with self._lock:
            if self._error is not None and not (isinstance(failed, EngineFatalError)
                                                and not isinstance(self._error, EngineFatalError)):
                return False
            self._error = failed
            outboxes = list(self._open.values())
        _wake(outboxes)
        return True

    def stop(self) -> None:
        """Marks the run stopped and wakes its waiting bundles: what they wait for will not come."""
        with self._lock:
            self.stopped = True
            outboxes = list(self._open.values())
        _wake(outboxes)

    def raise_if_failed(self) -> None:
        """Raises a fresh EngineError (or EngineFatalError) like the run's if it failed, or one if it was stopped."""
        error = self.error
        if error is not None:
            raise type(error)(str(error)) from error.__cause__
        if self.stopped:
            raise EngineError(f"{self.name}: this run was stopped (its last user released the engine)")

    def bundle_opened(self, outbox: queue.SimpleQueue) -> None:
        with self._lock:
            self._open[id(outbox)] = outbox
            self._no_open_bundle.clear()

    def bundle_closed(self, outbox: queue.SimpleQueue) -> None:
        with self._lock:
            self._open.pop(id(outbox), None)
            if not self._open:
                self._no_open_bundle.set()

    def wait_for_no_open_bundle(self, timeout_s: float) -> bool:
        return self._no_open_bundle.wait(timeout_s)


def _wake(outboxes: list[queue.SimpleQueue]) -> None:
    for outbox in outboxes:
        outbox.put(WAKE)


class _ProcessHealth:
    """The device fault, if any, that dooms this process; the runs it must fail; the exit."""

    def __init__(self) -> None:
        self.error: EngineFatalError | None = None
        self.runs: weakref.WeakSet[RunHealth] = weakref.WeakSet()
        self.bundle_asked = threading.Event()  # a bundle was asked for after the fault: the last ones are reported
        self._lock = threading.Lock()

    def add(self, run: RunHealth) -> None:
        with self._lock:
            self.runs.add(run)

    def snapshot(self) -> list[RunHealth]:
        with self._lock:  # a WeakSet cannot be iterated while another thread adds to it
            return list(self.runs)

    def fault(self, run: RunHealth, error: BaseException, where: str) -> None:
        """A device fault (or engine state that cannot be trusted) in `where` of `run`: every run of the process
        fails with EngineFatalError, and the process exits with errors.FATAL_EXIT_CODE once their open bundles
        have raised and been reported (or after a grace)."""
        failed = EngineFatalError(
            f"{run.name}: device fault in {where}: {error!r}. The device is unusable in this process: the worker "
            f"process exits with code {errors.FATAL_EXIT_CODE} so that the runner replaces it and retries its "
            f"bundles.")
        failed.__cause__ = error
        with self._lock:
            first = self.error is None
            if first:
                self.error = failed
        if not first:
            _LOG.warning("beam_infer: after a device fault, also in %s: %r", where, error)
            return
        _LOG.critical("%s", failed, exc_info=error)
        for health in self.snapshot():
            health.mark(failed)
        # The exit function is taken now: a test that replaced it gets its replacement called.
        threading.Thread(target=self._exit_when_reported, args=(errors.exit_process, str(failed)),
                         name="beam_infer-fatal", daemon=True).start()

    def _exit_when_reported(self, exit_process: Callable[[int, str], None], message: str) -> None:
        deadline = time.monotonic() + _FATAL_GRACE_S
        for health in self.snapshot():
            health.wait_for_no_open_bundle(max(0.0, deadline - time.monotonic()))
        self.bundle_asked.wait(_FATAL_REPORT_S)
        exit_process(errors.FATAL_EXIT_CODE, f"beam_infer: exiting the worker process (code "
                                             f"{errors.FATAL_EXIT_CODE}) after a device fault. {message}")


_PROCESS = _ProcessHealth()


def process_fault() -> EngineFatalError | None:
    """The device fault that dooms this process, if any."""
    return _PROCESS.error


def bundle_asked_after_fault() -> None:
    """Tells the exit that the harness asked for a new bundle: it has reported the failed ones, so exit now."""
    _PROCESS.bundle_asked.set()
