"""The engine: one per worker process per (task, device, dtype), shared by every DoFn thread of the process.

    submit ─► fetch pool ─► decode pool ─► ready ─► [batch] collate → H2D (or device preprocess)
           ─► [forward] forward → D2H ─► [unload] sync → postprocess pool ─► the record's bundle

Every record comes back exactly once to the bundle that submitted it, as a Result: a value, or a failure
naming the stage. See README.md in this folder for the life of a batch.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from beam_infer.config import EngineConfig
from beam_infer.engine.accounting import Stats, Tally
from beam_infer.engine.batcher import Batcher
from beam_infer.engine.pinned import BufferPool, Lease, ReleaseAfter
from beam_infer.engine.results import Failure, Result
from beam_infer.engine.streams import Streams
from beam_infer.engine.tensors import as_numpy, concat_chunks, unaliased
from beam_infer.engine.workers import Workers
from beam_infer.io.fetch import fetch_bytes, is_local
from beam_infer.task import InferenceTask, Record

_LOG = logging.getLogger(__name__)
_QUEUE_DEPTH = 2  # batches waiting between batch→forward and forward→unload: one in flight per boundary
_HEALTH_CHECK_S = 1.0  # how often a blocked caller looks whether the engine has failed
_STOP = object()  # sent down the stage queues to end the threads
_WAKE = object()  # makes the batch thread look again at a draining bundle

STAGES = ("fetch", "preprocess", "collate", "h2d", "device_preprocess", "forward", "d2h", "postprocess")


@dataclass
class _Item:
    result: Result
    outbox: queue.SimpleQueue
    array: np.ndarray | None = None
    done: bool = False


@dataclass
class _Batch:
    number: int
    items: list[_Item]
    lease: Lease | None  # the pinned input buffer; None when the task preprocesses on the device
    device_input: torch.Tensor
    h2d_done: torch.cuda.Event | None
    rows: list[int] = field(default_factory=list)  # items that the forward pass produced outputs for
    outputs: tuple[torch.Tensor, ...] = ()  # one tensor per model output, rows in the order of `rows`
    out_leases: list[Lease] = field(default_factory=list)
    d2h_done: torch.cuda.Event | None = None


class EngineError(RuntimeError):
    """An engine thread failed outside any one record's handling; the bundles waiting on it cannot finish."""


class Bundle:
    """The records one bundle submitted: `submit` them, `poll` what is finished, `drain` the rest.

    Owned by one DoFn thread; only that thread calls its methods.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._done: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self.pending = 0

    def submit(self, record: Record, context: Any = None) -> None:
        """Hands a record ({"uri": …, "id": …}) to the engine; blocks while the engine is full."""
        self._engine._submit(_Item(Result(record, context), self._done))
        self.pending += 1

    def poll(self) -> list[Result]:
        """The records of this bundle finished so far, without waiting."""
        out = []
        while self.pending and not self._done.empty():
            out.append(self._done.get())
            self.pending -= 1
        return out

    def drain(self) -> Iterator[Result]:
        """Yields every remaining record of this bundle, waiting for them; partial batches are flushed."""
        with self._engine._draining_bundle():
            while self.pending:
                try:
                    result = self._done.get(timeout=_HEALTH_CHECK_S)
                except queue.Empty:
                    self._engine._raise_if_failed()
                    continue
                self.pending -= 1
                yield result


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
        self.task = task
        self.config = config
        configure_process(config, config.torch_device())
        self.model, self.device, self.dtype = load_on_device(task, config)
        self.streams = Streams(self.device, timing=config.trace_events)
        pin = self.device.type == "cuda"
        self.input_buffers = BufferPool(config.host_buffers, pin=pin)
        self.output_buffers: BufferPool | None = None  # pinned, sized on the first batch: buffers x outputs
        self._outputs_per_batch = 0
        self.trace: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []  # (batch, stage, start, end)
        self._lock = threading.Lock()  # counters shared by the stage threads
        self._lifecycle = threading.Lock()  # start/stop; never held by a stage thread, so _stop can join them
        self._users = 0
        self._running = False
        self._error: BaseException | None = None
        self._batches = 0
        self._row_limits: dict[str, int] = {}  # stage -> most rows per call, lowered by CUDA out-of-memory errors
        self._stats = Stats()
        _LIVE_ENGINES.add(self)
        _LOG.info("beam_infer engine started: model %s on %s (%s) in process %d", task.name, self.device,
                  self.dtype, os.getpid())

    # ---- lifecycle -------------------------------------------------------------------------------------

    def retain(self) -> Engine:
        """Registers a user; the first one starts the threads."""
        with self._lifecycle:
            self._users += 1
            if not self._running:
                self._start()
        return self

    def release(self) -> None:
        """Unregisters a user; the last one stops and joins every thread."""
        with self._lifecycle:
            self._users -= 1
            if self._users <= 0 and self._running:
                self._stop()

    def close(self) -> None:
        """Stops the threads whatever the users (interpreter exit)."""
        with self._lifecycle:
            self._users = 0
            if self._running:
                self._stop()

    @property
    def running(self) -> bool:
        return self._running

    def open_bundle(self) -> Bundle:
        return Bundle(self)

    def take_stats(self) -> tuple[dict[str, float], list[int]]:
        """Host seconds per stage and the sizes of the batches run since the last call (by any caller)."""
        return self._stats.take()

    def _start(self) -> None:
        c = self.config
        self._error = None
        self._room: queue.SimpleQueue = queue.SimpleQueue()  # one token per record that may be in flight
        for _ in range(c.in_flight_limit):
            self._room.put(None)
        self._submitted = Tally()  # upstream = submitted - left: not yet ready for the batcher nor failed
        self._left = Tally()
        self._draining = 0  # bundles waiting in drain()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # bounded by _room
        self._to_forward: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._to_unload: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._fetch_pool = Workers("beam_infer-fetch", c.fetch_threads, self._fail)
        self._decode_pool = Workers("beam_infer-decode", c.decode_pool_size, self._fail)
        self._post_pool = Workers("beam_infer-post", c.postprocess_threads, self._fail)
        self._threads = [
            threading.Thread(target=self._batch_thread, name="beam_infer-batch", daemon=True),
            threading.Thread(target=self._run_stage, args=(self._to_forward, self._forward, self._to_unload),
                             name="beam_infer-forward", daemon=True),
            threading.Thread(target=self._run_stage, args=(self._to_unload, self._unload, None),
                             name="beam_infer-unload", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._running = True

    def _stop(self) -> None:
        self._running = False
        self._fetch_pool.stop(cancel=True)
        self._decode_pool.stop(cancel=True)
        self._ready.put(_STOP)
        for t in self._threads:
            t.join()
        self._post_pool.stop(cancel=False)

    # ---- submission and the CPU stages -----------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise EngineError(f"beam_infer engine for {self.task.name} failed: {self._error!r}") from self._error

    def _submit(self, item: _Item) -> None:
        if not self._running:
            raise EngineError("submit() on an engine that is not running: call retain() first")
        while True:
            try:
                self._room.get(timeout=_HEALTH_CHECK_S)
                break
            except queue.Empty:
                self._raise_if_failed()
        self._raise_if_failed()
        self._submitted.add()
        uri = item.result.record["uri"]
        if isinstance(uri, str) and is_local(uri):
            self._decode_pool.submit(self._fetch, item, True)  # a local read costs less than a hand-off
        else:
            self._fetch_pool.submit(self._fetch, item, False)

    def _fetch(self, item: _Item, in_decode_pool: bool) -> None:
        t0 = time.perf_counter()
        try:
            data = fetch_bytes(item.result.record["uri"])
        except Exception as e:  # noqa: BLE001 - any error reading one record is that record's failure
            self._leave_upstream(item, Failure.of("fetch", e))
            return
        self._stats.busy("fetch", time.perf_counter() - t0)
        if in_decode_pool:
            self._preprocess(item, data)
        else:
            self._decode_pool.submit(self._preprocess, item, data)

    def _preprocess(self, item: _Item, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            item.array = np.ascontiguousarray(self.task.preprocess(data, item.result.record))
        except Exception as e:  # noqa: BLE001
            self._leave_upstream(item, Failure.of("preprocess", e))
            return
        self._stats.busy("preprocess", time.perf_counter() - t0)
        self._leave_upstream(item, None)

    def _leave_upstream(self, item: _Item, failure: Failure | None) -> None:
        if failure is None:
            self._ready.put(item)
        else:
            self._finish(item, failure=failure)
        self._left.add()
        if self._draining and self._nothing_upstream():
            self._ready.put(_WAKE)

    def _nothing_upstream(self) -> bool:
        """True only if, at some moment during the call, every submitted record had left the fetch and decode
        stages (`left` is read first, so a record submitted meanwhile makes it False, never wrongly True)."""
        left = self._left.value
        return self._submitted.value == left

    def _finish(self, item: _Item, *, value: dict[str, Any] | None = None, failure: Failure | None = None) -> None:
        item.result.value, item.result.failure = value, failure
        item.array = None
        item.done = True
        item.outbox.put(item.result)
        self._room.put(None)

    @contextlib.contextmanager
    def _draining_bundle(self) -> Iterator[None]:
        """While a bundle drains, the batch thread flushes partial batches as soon as nothing more is coming."""
        with self._lock:
            self._draining += 1
        self._ready.put(_WAKE)
        try:
            yield
        finally:
            with self._lock:
                self._draining -= 1

    # ---- the stage threads -----------------------------------------------------------------------------

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Runs one step of a stage thread; an unexpected error (a bug, not a bad record) fails the engine."""
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - fail the waiting bundles loudly, keep the thread alive
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        _LOG.error("beam_infer engine stage failed", exc_info=error)
        self._error = error

    def _run_stage(self, inbox: queue.Queue, handle: Callable[[Any], None], outbox: queue.Queue | None) -> None:
        """Runs `handle` on every message until _STOP, then passes _STOP on."""
        for msg in iter(inbox.get, _STOP):
            self._guard(handle, msg)
        if outbox is not None:
            outbox.put(_STOP)

    def _batch_thread(self) -> None:
        try:
            self._batch_loop()
        except BaseException as e:  # noqa: BLE001 - a bug here: waiting bundles raise instead of hanging
            self._fail(e)
        finally:
            self._to_forward.put(_STOP)

    def _batch_loop(self) -> None:
        """Batches ready records by size, by age, or when a draining bundle waits on nothing else."""
        batcher: Batcher[_Item] = Batcher(self.config.batch_size, self.config.max_batch_wait_s)
        while True:
            try:
                msgs = [self._ready.get(timeout=batcher.time_left())]
            except queue.Empty:
                msgs = [None]  # the open batch is due by age
            while len(msgs) < self.config.batch_size and not self._ready.empty():
                msgs.append(self._ready.get())  # whatever else is ready: one wake-up per burst, not per record
            for msg in msgs:
                if msg is _STOP:  # the last message: the pools upstream have stopped
                    self._guard(self._launch, batcher.take())
                    return
                if msg is None:
                    self._guard(self._launch, batcher.take())
                elif msg is not _WAKE and (batch := batcher.add(msg)):
                    self._guard(self._launch, batch)
            if len(batcher) and self._nothing_more_for_draining():
                self._guard(self._launch, batcher.take())

    def _nothing_more_for_draining(self) -> bool:
        return self._draining > 0 and self._nothing_upstream() and self._ready.empty()

    def _launch(self, items: list[_Item] | None) -> None:
        """Moves a batch to the device (collate + H2D copy, or the task's device preprocess), then queues it."""
        if not items:
            return
        number = self._batches
        self._batches += 1
        s = self.streams
        try:
            if self.task.device_preprocess is None:
                good, lease, device_input, start = self._collate_and_copy(items)
                stage = "h2d"
            else:
                good, lease, device_input, start = self._preprocess_on_device(items)
                stage = "device_preprocess"
        except Exception as e:  # noqa: BLE001 - not one record's fault: the batch's records fail, the engine goes on
            self._fail_batch(items, "collate" if self.task.device_preprocess is None else "device_preprocess", e)
            return
        h2d_done = s.record(s.h2d)
        if start is not None:
            self.trace.append((number, stage, start, h2d_done))
        if good:
            self._to_forward.put(_Batch(number, good, lease, device_input, h2d_done))

    def _trace_start(self) -> torch.cuda.Event | None:
        """With trace_events, an event on the H2D stream where the batch's device work starts (after the host's)."""
        return self.streams.record(self.streams.h2d) if self.config.trace_events else None

    def _collate_and_copy(self, items: list[_Item]) -> tuple[list[_Item], Lease, torch.Tensor, Any]:
        """Stacks the arrays into a pinned host buffer and starts its copy on the H2D stream."""
        t0 = time.perf_counter()
        shape, dtype = items[0].array.shape, items[0].array.dtype
        good = []
        for item in items:
            if item.array.shape != shape or item.array.dtype != dtype:
                self._finish(item, failure=Failure(
                    "collate", "ValueError",
                    f"preprocessed shape {item.array.shape} {item.array.dtype} differs from the batch's "
                    f"{shape} {dtype}"))
            else:
                good.append(item)
        waited = time.perf_counter()
        lease = self.input_buffers.acquire((len(good), *shape), torch.from_numpy(np.empty(0, dtype)).dtype)
        waited = time.perf_counter() - waited  # backpressure: every buffer still in use; not collate's work
        try:
            np.stack([item.array for item in good], out=lease.tensor.numpy())
            t1 = time.perf_counter()
            start = self._trace_start()
            with self.streams.on(self.streams.h2d):
                device_input = lease.tensor.to(self.device, non_blocking=True)
        except BaseException:
            lease.release()
            raise
        self._stats.busy("collate", t1 - t0 - waited)
        self._stats.busy("h2d", time.perf_counter() - t1)
        return good, lease, device_input, start

    def _preprocess_on_device(self, items: list[_Item]) -> tuple[list[_Item], None, torch.Tensor | None, Any]:
        """Hands the batch's arrays, as CPU tensors, to the task's device preprocess on the H2D stream."""
        t0 = time.perf_counter()
        preprocess = self.task.device_preprocess
        chunks: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []
        failures: list[tuple[int, Failure]] = []
        h2d = self.streams.h2d

        def call(xs: list[torch.Tensor]) -> tuple[torch.Tensor]:
            # A device decoder may write from a stream of its own (torchvision's nvJPEG does) into memory that
            # the caching allocator freed on the H2D stream: the work queued there (the previous batch's, or
            # this batch's earlier chunks after a bisection or an out-of-memory split) must be over first.
            self.streams.drain(h2d)
            return (preprocess(xs, self.device),)

        start = self._trace_start()
        with self.streams.on(h2d):
            encoded = [torch.from_numpy(item.array) for item in items]
            step = self._row_limits.get("device_preprocess") or len(items)
            for lo in range(0, len(items), step):
                self._bisect(call, encoded, lo, min(lo + step, len(items)), "device_preprocess", chunks, failures)
            device_input = concat_chunks(chunks)[0] if chunks else None  # on the H2D stream, which h2d_done covers
        for index, failure in failures:
            self._finish(items[index], failure=failure)
        good = [items[i] for a, b, _ in chunks for i in range(a, b)]
        self._stats.busy("device_preprocess", time.perf_counter() - t0)
        return good, None, device_input, start

    def _forward(self, batch: _Batch) -> None:
        """Runs the model on the compute stream once the batch's copy is done, then starts the D2H copy."""
        try:
            self._forward_and_copy_out(batch)
        except Exception as e:  # noqa: BLE001 - outside any one record (joining outputs, a copy): the batch fails
            copied = self.streams.record(self.streams.d2h)  # copies into the output buffers may be in flight
            for lease in batch.out_leases:
                lease.release(fence=copied)
            self._fail_batch(batch.items, "forward", e)
            return
        finally:
            if batch.lease is not None:
                batch.lease.release(fence=batch.h2d_done)  # on CPU the forward already read it
        self._to_unload.put(batch)

    def _forward_and_copy_out(self, batch: _Batch) -> None:
        s = self.streams
        t0 = time.perf_counter()
        s.wait(s.compute, batch.h2d_done)
        start = s.record(s.compute) if self.config.trace_events else None
        chunks: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []
        failures: list[tuple[int, Failure]] = []
        with s.on(s.compute), torch.inference_mode():
            s.keep_for(batch.device_input, s.compute)
            rows = len(batch.items)
            step = self._row_limits.get("forward") or rows
            for lo in range(0, rows, step):  # after a CUDA OOM, in chunks no larger than the last size that fit
                self._bisect(self.model, batch.device_input, lo, min(lo + step, rows), "forward", chunks, failures)
            for index, failure in failures:
                self._finish(batch.items[index], failure=failure)
            batch.rows = [i for a, b, _ in chunks for i in range(a, b)]
            outputs = concat_chunks(chunks)
            if not s.cuda:  # an output that is a view of the input would see the next batch collated into it
                outputs = tuple(unaliased(out, batch.device_input) for out in outputs)
        forward_done = s.record(s.compute)
        if start is not None:
            self.trace.append((batch.number, "forward", start, forward_done))
        t1 = time.perf_counter()
        if s.cuda and outputs:
            if self.output_buffers is None or self._outputs_per_batch < len(outputs):
                self._outputs_per_batch = len(outputs)
                self.output_buffers = BufferPool(self.config.host_buffers * len(outputs), pin=True)
            with s.on(s.d2h):
                s.wait(s.d2h, forward_done)
                copies = []
                for out in outputs:
                    s.keep_for(out, s.d2h)
                    lease = self.output_buffers.acquire(out.shape, out.dtype)
                    batch.out_leases.append(lease)
                    lease.tensor.copy_(out, non_blocking=True)
                    copies.append(lease.tensor)
                outputs = tuple(copies)
            batch.d2h_done = s.record(s.d2h)
        batch.outputs = outputs
        self._stats.busy("forward", t1 - t0)

    def _fail_batch(self, items: list[_Item], stage: str, error: BaseException) -> None:
        """A batch-level error that no record alone caused: each of the batch's records not yet finished fails."""
        _LOG.warning("beam_infer: a batch of %d records failed in %s: %r", len(items), stage, error)
        failure = Failure.of(stage, error)
        for item in items:
            if not item.done:
                self._finish(item, failure=failure)

    def _bisect(self, fn: Callable[[Any], Any], x: Any, start: int, stop: int, stage: str,
                chunks: list[tuple[int, int, tuple[torch.Tensor, ...]]], failures: list[tuple[int, Failure]]) -> None:
        """Runs `fn` on rows [start, stop) of `x` (a batch tensor or a list); on an error, bisects down to the
        records that cause it, so the others go on (halving is also the answer to a CUDA out-of-memory)."""
        try:
            outs = fn(x[start:stop])
            outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
            for out in outs:
                if not isinstance(out, torch.Tensor) or out.shape[:1] != (stop - start,):
                    raise ValueError(f"{stage} must return tensors with the batch ({stop - start}) as their "
                                     f"first dimension, got {getattr(out, 'shape', type(out).__name__)}")
            chunks.append((start, stop, outs))
        except Exception as e:  # noqa: BLE001 - find the records that cause it; the others go on
            out_of_memory = _out_of_memory(e)
            if out_of_memory:
                torch.cuda.empty_cache()
            if stop - start == 1:
                failures.append((start, Failure.of(stage, e)))
                return
            failed_before = len(failures)
            mid = (start + stop) // 2
            self._bisect(fn, x, start, mid, stage, chunks, failures)
            self._bisect(fn, x, mid, stop, stage, chunks, failures)
            if out_of_memory and len(failures) == failed_before:  # the size, not a record: later calls go smaller
                self._lower_row_limit(stage, stop - start)

    def _lower_row_limit(self, stage: str, rows_that_failed: int) -> None:
        limit = max(1, rows_that_failed // 2)
        if limit < self._row_limits.get(stage, rows_that_failed + 1):
            self._row_limits[stage] = limit
            _LOG.warning("beam_infer: CUDA out of memory in %s at %d rows; from now on at most %d rows per call",
                         stage, rows_that_failed, limit)

    def _unload(self, batch: _Batch) -> None:
        """Waits for the D2H copy, hands each record's output rows to the postprocess pool.

        The rows are views of the pinned output buffers (no copy); the buffers go back to their pool once
        every postprocess call of the batch has returned.
        """
        t0 = time.perf_counter()
        items = [batch.items[i] for i in batch.rows]
        try:
            self.streams.synchronize(batch.d2h_done)
            arrays = [as_numpy(out) for out in batch.outputs]
        except Exception as e:  # noqa: BLE001 - the batch's records fail, the engine goes on
            for lease in batch.out_leases:
                lease.release()
            self._fail_batch(items, "d2h", e)
            return
        self._stats.busy("d2h", time.perf_counter() - t0)
        self._stats.batch(len(batch.items))
        step = max(1, -(-len(items) // self.config.postprocess_threads))
        spans = [(lo, min(lo + step, len(items))) for lo in range(0, len(items), step)]
        release = ReleaseAfter(len(spans), batch.out_leases)
        for lo, hi in spans:
            self._post_pool.submit(self._postprocess, items[lo:hi], [x[lo:hi] for x in arrays], release)

    def _postprocess(self, items: list[_Item], arrays: list[np.ndarray], release: ReleaseAfter) -> None:
        t0 = time.perf_counter()
        done: list[tuple[_Item, dict[str, Any] | None, Failure | None]] = []
        try:
            for row, item in enumerate(items):
                try:
                    value = self.task.postprocess(tuple(x[row] for x in arrays), item.result.record)
                    done.append((item, release.detach(value, arrays), None))
                except Exception as e:  # noqa: BLE001
                    done.append((item, None, Failure.of("postprocess", e)))
        finally:
            release.done()
        self._stats.busy("postprocess", time.perf_counter() - t0)  # before the bundles can see their results
        for item, value, failure in done:
            self._finish(item, value=value, failure=failure)


def _out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, also as torchvision's nvJPEG reports it (a RuntimeError with the message)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _close_all() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close()


atexit.register(_close_all)  # no engine thread outlives the interpreter
