"""Workers: a fixed set of threads taking calls from one queue; the engine's fetch, decode and postprocess pools.

Lighter than concurrent.futures.ThreadPoolExecutor on the per-record path: a submit is one put on a C queue,
with no Future, no condition variable and no thread-count check, which matters at tens of microseconds per
record.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = None


class Workers:
    """`threads` daemon threads named `<name>_<i>` running submitted calls in order of submission.

    `handle_error` receives any exception a call raises; the thread goes on with the next call.
    """

    def __init__(self, name: str, threads: int, handle_error: Callable[[BaseException], None]) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._handle_error = handle_error
        self._threads = [threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True) for i in range(threads)]
        for started, t in enumerate(self._threads):
            try:
                t.start()
            except BaseException:
                for _ in range(started):  # those already running end; this pool is never handed out
                    self._queue.put(_STOP)
                raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    @property
    def backlog(self) -> int:
        """Calls waiting for a thread (approximate)."""
        return self._queue.qsize()

    def _run(self) -> None:
        while (call := self._queue.get()) is not _STOP:
            fn, args = call
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported to the owner; the worker stays alive
                self._handle_error(e)

    def stop(self, *, cancel: bool, deadline: float | None = None) -> list[str]:
        """Ends the threads after the calls already queued (dropped first when `cancel`) and joins them.

        Returns:
            The names of the threads still running at `deadline` (time.monotonic()); none without a deadline.
        """
        if cancel:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]
