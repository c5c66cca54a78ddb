"""The health of one engine run: the error that ended it, the bundles waiting on it, and, after a device fault,
the exit of the worker process once those bundles have failed."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from beam_infer.engine import errors
from beam_infer.engine.errors import EngineError, EngineFatalError, Owner, owner_of

_LOG = logging.getLogger(__name__)
_FATAL_GRACE_S = 5.0  # after a device fault, the longest the process waits for its bundles to fail before exiting
WAKE = object()  # put in a bundle's result queue when the run fails, so that a waiting drain looks at once


class RunHealth:
    """Whether a run failed (`error`) or was stopped, and the result queues of the bundles open on it.

    Args:
        name: how errors name the engine ("beam_infer engine for <task> on <device>").
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: EngineError | None = None  # set by the first failure no record or batch owns
        self.stopped = False
        self._lock = threading.Lock()
        self._open: dict[int, queue.SimpleQueue] = {}
        self._no_open_bundle = threading.Event()
        self._no_open_bundle.set()

    @property
    def fatal(self) -> bool:
        return isinstance(self.error, EngineFatalError)

    def fail(self, error: BaseException, where: str) -> None:
        """Ends the run with `error`, raised in `where`: the bundles open on it raise EngineError from their next
        call. A device fault also makes the process exit once they have (errors.exit_process), or after a grace."""
        fatal = owner_of(error, Owner.RUN) is Owner.FATAL
        if fatal:
            failed: EngineError = EngineFatalError(
                f"{self.name}: device fault in {where}: {error!r}. The device is unusable in this process: the "
                f"worker process exits with code {errors.FATAL_EXIT_CODE} so that the runner replaces it and retries "
                f"its bundles.")
        else:
            failed = EngineError(f"{self.name} failed in {where}: {error!r}. The bundles waiting on it fail (the "
                                 f"runner retries them); the next bundle gets a fresh run of the engine.")
        failed.__cause__ = error
        with self._lock:
            replaces = self.error is None or (fatal and not self.fatal)
            if replaces:
                self.error = failed
            outboxes = list(self._open.values())
        if not replaces:
            _LOG.warning("beam_infer: after the engine run failed, also in %s: %r", where, error)
            return
        _LOG.error("%s", failed, exc_info=error)
        for outbox in outboxes:
            outbox.put(WAKE)
        if fatal:  # the exit function is taken now: a test that replaced it gets its replacement called
            threading.Thread(target=self._exit_after_bundles_failed, args=(errors.exit_process,),
                             name="beam_infer-fatal", daemon=True).start()

    def _exit_after_bundles_failed(self, exit_process: Callable[[int], None]) -> None:
        """Gives the bundles that were waiting time to report their failure to the runner, then exits."""
        self._no_open_bundle.wait(_FATAL_GRACE_S)
        _LOG.critical("beam_infer: exiting the worker process (code %d) after a device fault",
                      errors.FATAL_EXIT_CODE)
        exit_process(errors.FATAL_EXIT_CODE)

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
