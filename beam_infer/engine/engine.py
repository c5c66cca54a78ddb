"""The engine: one per worker process per (task, device, dtype), shared by every DoFn thread of the process.

It holds what lives as long as the process (the model on its device, the CUDA streams, the row limits learnt
from out-of-memory errors, the busy-time accounting) and one Run at a time: the stage threads, queues and host
buffers (run.py). Bundles submit records into the current run; a run that failed is replaced by a fresh one
for the next bundle. Every record comes back exactly once to the bundle that submitted it, as a Result: a
value, or a failure naming the stage. See README.md in this folder for the life of a batch and its failures.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from beam_infer.config import EngineConfig
from beam_infer.engine.accounting import Stats, Tally
from beam_infer.engine.chunks import RowLimits
from beam_infer.engine.errors import EngineError, EngineFatalError, EngineStateError
from beam_infer.engine.health import WAKE, bundle_asked_after_fault, process_fault
from beam_infer.engine.results import Result
from beam_infer.engine.run import DEVICE_THREADS, HEALTH_CHECK_S, Item, Run
from beam_infer.engine.streams import Streams
from beam_infer.engine.telemetry import start_sampler
from beam_infer.task import InferenceTask, Record

_LOG = logging.getLogger(__name__)
_TRACE_KEPT = 4096  # timed (batch, stage) spans kept with trace_events: the last ~1,400 batches' three spans

STAGES = ("fetch", "preprocess", "collate", "h2d", "device_preprocess", "forward", "d2h", "postprocess", "put")


class Bundle:
    """The records one bundle submitted: `submit` them, `poll` what is finished, `drain` the rest.

    Owned by one DoFn thread; only that thread calls its methods. Each raises EngineError once the engine run the
    bundle was opened in has failed: the runner then retries the bundle, and the retry gets a fresh run.
    """

    def __init__(self, run: Run) -> None:
        self._run = run
        self._health = run.health
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._open = True
        self.pending = 0
        self._health.bundle_opened(self._done)

    def submit(self, record: Record, context: Any = None) -> None:
        """Hands a record ({"uri": …, "id": …}) to the engine; blocks while the engine is full."""
        self._check()
        try:
            self._run.submit(Item(Result(record, context), self._done))
        except EngineError:
            self.close()
            raise
        self.pending += 1

    def poll(self) -> list[Result]:
        """The records of this bundle finished so far, without waiting."""
        self._check()
        out = []
        while self.pending and not self._done.empty():
            result = self._done.get()
            if result is not WAKE:
                out.append(result)
                self.pending -= 1
        return out

    def drain(self) -> Iterator[Result]:
        """Yields every remaining record of this bundle, waiting for them; partial batches are flushed."""
        with self._run.draining_bundle():
            while self.pending:
                self._check()
                try:
                    result = self._done.get(timeout=HEALTH_CHECK_S)  # a failing run also wakes it (WAKE)
                except queue.Empty:
                    continue
                if result is WAKE:
                    continue
                self.pending -= 1
                yield result
        self.close()

    def _check(self) -> None:
        if self._health.error is not None or self._health.stopped:
            self.close()
            self._health.raise_if_failed()

    def close(self) -> None:
        """Forgets the bundle without waiting: drained, failed, or abandoned by its DoFn (a failure downstream)."""
        if self._open:
            self._open = False
            self._health.bundle_closed(self._done)


def configure_process(config: EngineConfig, device: torch.device) -> None:
    """The process-wide settings an engine makes: the GIL switch interval (`config.gil_switch_interval_s`) and,
    on CUDA, one thread for torch's CPU ops, as in a DataLoader worker: the model runs on the GPU, so the CPU's
    torch work is the decode threads' own, and an intra-op pool would give each of them an OpenMP team."""
    if config.gil_switch_interval_s:
        sys.setswitchinterval(config.gil_switch_interval_s)
    if device.type == "cuda":
        torch.set_num_threads(1)


def load_on_device(task: InferenceTask, config: EngineConfig) -> tuple[Callable[..., Any], torch.device,
                                                                      torch.dtype]:
    """Builds the task's model and moves it to the config's device, dtype and memory format, compiled if asked.

    Returns:
        (the model, ready to call on a batch; the device; the dtype)
    """
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    model = task.load_model().eval().to(device, dtype)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return (torch.compile(model) if config.compile else model), device, dtype


class Engine:
    """Loads the task's model once onto the device and runs the overlapped stage pipeline over it.

    Threads run while at least one user holds the engine (`retain` / `release`); the model stays loaded.
    """

    def __init__(self, task: InferenceTask, config: EngineConfig) -> None:
        if config.max_tokens and task.pad_value is None:
            raise ValueError(f"EngineConfig.max_tokens ({config.max_tokens}) bounds batches of variable-length "
                             f"inputs, and task {task.name} has fixed-size ones (no pad_value)")
        self.task = task
        self.config = config
        self.in_flight_limit = config.in_flight_limit_for(task.pad_value is not None)
        configure_process(config, config.torch_device())
        self.model, self.device, self.dtype = load_on_device(task, config)
        self.streams = Streams(self.device, timing=config.trace_events)
        self.row_limits = RowLimits()  # most rows per call, per stage, after CUDA out-of-memory errors
        self.stats = Stats()
        self.finished = Tally()  # records returned to their bundle, every run
        self.failed = Tally()  # of them, those with a failure (dead letters)
        # (batch, stage, start, end) timed events with trace_events, a bounded ring
        self.trace: collections.deque[tuple[int, str, Any, Any]] = collections.deque(maxlen=_TRACE_KEPT)
        self._batch_numbers = itertools.count()
        self._lifecycle = threading.Lock()  # start/stop; never held by a stage thread, so a stop can join them
        self._users = 0
        self._run: Run | None = None
        self.runs_started = 0
        _LIVE_ENGINES.add(self)
        directory = config.telemetry_dir
        self._sampler = start_sampler(self, directory, config.telemetry_interval_s) if (
            directory and os.path.isdir(directory)) else None  # a remote worker lacks the launcher's directory
        _LOG.info("beam_infer engine started: model %s on %s (%s) in process %d", task.name, self.device,
                  self.dtype, os.getpid())

    # ---- lifecycle -------------------------------------------------------------------------------------

    def retain(self) -> Engine:
        """Registers a user; the first one starts the threads."""
        with self._lifecycle:
            if self._run is None:
                self._start()  # raises before counting the user, who will not release
            self._users += 1
        return self

    def release(self) -> None:
        """Unregisters a user; the last one stops and joins every thread."""
        with self._lifecycle:
            self._users -= 1
            if self._users <= 0 and self._run is not None:
                self._stop()

    def close(self) -> None:
        """Stops the threads whatever the users (interpreter exit)."""
        with self._lifecycle:
            self._users = 0
            if self._run is not None:
                self._stop(exiting=True)
            if self._sampler is not None:
                self._sampler.close()

    @property
    def running(self) -> bool:
        return self._run is not None

    @property
    def current_run(self) -> Run | None:
        return self._run

    def open_bundle(self) -> Bundle:
        """A bundle in the current run; after a failure that was not a device fault, in a fresh run.

        Raises:
            EngineError: the engine is not running (no retain), or EngineFatalError after a device fault.
        """
        _refuse_after_a_device_fault()
        with self._lifecycle:
            run = self._run
            if run is None and self._users <= 0:
                raise EngineError("open_bundle() on an engine that is not running: call retain() first")
            if run is not None and run.error is not None:
                _LOG.warning("beam_infer: replacing the failed engine run of %s with a fresh one", self.task.name)
                self._stop()
                _refuse_after_a_device_fault()  # its device threads did not stop: the worker cannot go on
            if self._run is None:  # replaced, or an earlier start failed
                self._start()
            return Bundle(self._run)

    def take_stats(self) -> tuple[dict[str, float], list[int], dict[str, int]]:
        """Host seconds per stage, the sizes of the batches run, and event counts (remote retries and failures),
        since the last call (by any caller)."""
        return self.stats.take()

    def next_batch_number(self) -> int:
        return next(self._batch_numbers)

    def _start(self) -> None:
        if _interrupted:  # threads of the stopped run may still be inside the model: no second run beside them
            raise EngineError("the process is stopping on a signal: no new engine run")
        self._run = Run(self)
        self.runs_started += 1
        if self._sampler is not None:
            self._sampler.start()

    def _stop(self, *, exiting: bool = False) -> None:
        """Stops the current run. A device thread that does not stop leaves the engine's state unknown (a new run
        would call the model beside it): fatal, unless the interpreter is exiting anyway."""
        run, self._run = self._run, None
        # The process exits soon (a device fault, a signal): a teardown must not hold the exit up.
        doomed = _interrupted or process_fault() is not None
        timeout_s = 0.0 if doomed else self.config.stop_timeout_s
        stuck = None
        try:
            stuck = run.stop(timeout_s)
        finally:
            if self._sampler is not None:  # no NVML call where the device may be lost or a thread is stuck in it
                self._sampler.stop(final=not _interrupted, gpu=not doomed and stuck == [], run=run)
        if not stuck or _interrupted:  # daemon threads: they end with the process, which is ending by request
            return
        message = (f"engine threads of {self.task.name} did not stop within {timeout_s:.1f}s and are left "
                   f"running: {', '.join(stuck)}")
        if doomed or exiting or not set(stuck) & set(DEVICE_THREADS):
            _LOG.error("beam_infer: %s", message)
        else:
            run.health.fail(EngineStateError(message), "stop")


def _refuse_after_a_device_fault() -> None:
    """Raises EngineFatalError after a device fault in this process, telling its exit that the harness has asked
    for a new bundle, so has reported the ones that failed."""
    fault = process_fault()
    if fault is not None:
        bundle_asked_after_fault()
        raise EngineFatalError(str(fault)) from fault.__cause__


_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_interrupted = False  # set by interrupt_all(); a plain flag, as a signal handler sets it


def interrupt_all() -> None:
    """The process is about to end on a signal (Ctrl-C): from now on engines stop without waiting for their
    threads, which are daemon threads and end with the process. Safe to call from a signal handler."""
    global _interrupted
    _interrupted = True


def close_all_engines() -> None:
    """Stops every engine of this process (at exit, and when a job is interrupted)."""
    for engine in list(_LIVE_ENGINES):
        engine.close()


atexit.register(close_all_engines)  # no engine thread outlives the interpreter
