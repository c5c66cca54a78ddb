"""One run of the engine's stage threads: its queues, pools, host buffers, counters and the error that ends it.

    submit ─► fetch (local: in the decode pool; gs://, s3://, http(s)://: remote I/O's event loop; other URLs:
           the fetch pool) ─► decode pool ─► ready ─► [batch] collate → H2D (or device preprocess)
           ─► [forward] forward → D2H ─► [unload] sync → postprocess pool ─► put (Blobs) ─► the record's bundle

A run that fails is not repaired: its bundles raise EngineError and the engine starts a fresh run for the next
bundle (see Engine.open_bundle), so no state of a failed run reaches a later one. Who owns each failure is
decided by beam_infer.engine.errors.owner_of; see README.md in this folder.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import reprlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from beam_infer.engine.accounting import Tally
from beam_infer.engine.batcher import Batcher, LengthBatcher, padded_length
from beam_infer.engine.chunks import call_in_chunks
from beam_infer.engine.errors import EngineError, Owner, is_out_of_memory, owner_of
from beam_infer.engine.health import RunHealth
from beam_infer.engine.pinned import BufferPool, Lease, ReleaseAfter
from beam_infer.engine.results import Failure, Result
from beam_infer.engine.tensors import as_numpy, concat_chunks, unaliased
from beam_infer.engine.workers import Workers
from beam_infer.io import remote
from beam_infer.io.fetch import fetch_bytes, is_local, open_uri
from beam_infer.io.put import write_local_atomically
from beam_infer.task import Blob, Preprocessed

if TYPE_CHECKING:
    from beam_infer.engine.engine import Engine

_LOG = logging.getLogger(__name__)
_QUEUE_DEPTH = 2  # batches waiting between batch→forward and forward→unload: one in flight per boundary
HEALTH_CHECK_S = 1.0  # how often a caller blocked on the run (room, results) looks whether it has failed
_STOP = object()  # sent down the stage queues to end the threads
DEVICE_THREADS = ("beam_infer-batch", "beam_infer-forward", "beam_infer-unload")  # the threads that use the device
_WAKE = object()  # makes the batch thread look again: at a draining bundle, or at a free slot at the forward
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds a preprocess may return: bool, int, uint, float
_RECHECK_S = 0.05  # the longest a due batch of variable-length records waits to look again for room at the forward
_REMOTE_JOIN_MIN_S = 0.5  # remote I/O's thread gets this long to end even when the stop's deadline has passed


@dataclass
class Item:
    result: Result
    outbox: queue.SimpleQueue
    array: np.ndarray | None = None
    fields: dict[str, Any] | None = None  # from a Preprocessed: added to the record that postprocess sees
    done: bool = False


@dataclass
class Batch:
    number: int
    items: list[Item]
    lease: Lease | None  # the pinned input buffer; None when the task preprocesses on the device
    device_input: torch.Tensor | None  # dropped once the forward and the D2H copy are queued
    h2d_done: torch.cuda.Event | None
    rows: list[int] = field(default_factory=list)  # items that the forward pass produced outputs for
    outputs: tuple[torch.Tensor, ...] = ()  # one tensor per model output, rows in the order of `rows`
    out_leases: list[Lease] = field(default_factory=list)
    d2h_done: torch.cuda.Event | None = None


class Run:
    """The stage threads of one engine run, started at construction; `stop` ends them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._task, c = engine.task, engine.config
        self._config = c
        self._streams = engine.streams
        self._stats = engine.stats
        self._finished, self._failed = engine.finished, engine.failed
        self.health = RunHealth(f"beam_infer engine for {self._task.name} on {engine.device}")
        self._lock = threading.Lock()
        self._room: queue.SimpleQueue = queue.SimpleQueue()  # one token per record that may be in flight
        self._in_flight_limit = engine.in_flight_limit
        for _ in range(self._in_flight_limit):
            self._room.put(None)
        self._submitted = Tally()  # upstream = submitted - left: not yet ready for the batcher nor failed
        self._left = Tally()
        self._draining = 0  # bundles waiting in drain()
        self._waiting = 0  # ready records the batcher holds (a telemetry gauge, set by the batch thread)
        self._deferring = False  # the batch thread holds a due batch until the forward has room: wake it then
        self._closed = False  # stopping: no remote I/O starts
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # bounded by _room
        self._to_forward: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._to_unload: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self.input_buffers = BufferPool(c.host_buffers, pin=self._streams.cuda)
        self.output_buffers: BufferPool | None = None  # pinned, sized on the first batch: buffers x outputs
        self._outputs_per_batch = 0
        self._fetch_pool = self._decode_pool = self._post_pool = None
        self._remote: remote.RemoteIO | None = None  # started by the first remote read or write
        self._threads: list[threading.Thread] = []
        try:
            self._start_threads(c)
        except BaseException:
            self.stop(0.0)  # what did start ends; a thread that cannot be started is the process's trouble
            raise

    def _start_threads(self, c: Any) -> None:
        self._fetch_pool = Workers("beam_infer-fetch", c.fetch_threads, lambda e: self.fail(e, "fetch"))
        self._decode_pool = Workers("beam_infer-decode", c.decode_pool_size, lambda e: self.fail(e, "preprocess"))
        self._post_pool = Workers("beam_infer-post", c.postprocess_threads, lambda e: self.fail(e, "postprocess"))
        threads = [
            threading.Thread(target=self._batch_thread, name=DEVICE_THREADS[0], daemon=True),
            threading.Thread(target=self._run_stage, args=(self._to_forward, self._forward, self._to_unload,
                                                           "forward"), name=DEVICE_THREADS[1], daemon=True),
            threading.Thread(target=self._run_stage, args=(self._to_unload, self._unload, None, "d2h"),
                             name=DEVICE_THREADS[2], daemon=True),
        ]
        for t in threads:
            t.start()
            self._threads.append(t)

    # ---- lifecycle and failure ---------------------------------------------------------------------------

    def stop(self, timeout_s: float) -> list[str]:
        """Ends every thread (records still queued upstream are dropped) and joins them within `timeout_s`.

        Returns:
            The names of the threads still alive at the deadline (blocked in a model call, say).
        """
        deadline = time.monotonic() + timeout_s
        self.health.stop()
        stuck = []
        with self._lock:
            io, self._closed = self._remote, True
        if io is not None:
            io.begin_close()  # requests dropped; joined last: a busy loop cannot eat the device threads' time
        for pool in (self._fetch_pool, self._decode_pool):
            if pool is not None:
                stuck += pool.stop(cancel=True, deadline=deadline)
        self._ready.put(_STOP)
        if len(self._threads) < len(DEVICE_THREADS):  # a start that failed: the STOP cannot travel down the stages
            self._to_forward.put(_STOP)
            self._to_unload.put(_STOP)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck += [t.name for t in self._threads if t.is_alive()]
        if self._post_pool is not None:
            stuck += self._post_pool.stop(cancel=False, deadline=deadline)
        if io is not None and not io.join(max(_REMOTE_JOIN_MIN_S, deadline - time.monotonic())):
            stuck.append("beam_infer-remote")
        return stuck

    def _ended(self) -> bool:
        """A failed run's bundles raise, and a stopped run has none: its batches are not worth running (after a
        device fault, not possible), and a stop should not wait for them."""
        return self.health.error is not None or self.health.stopped

    def fail(self, error: BaseException, stage: str, batch: int | None = None, records: int = 0) -> None:
        """Ends the run with `error`, raised in `stage` (of batch number `batch`, of `records` records); see
        RunHealth.fail."""
        self.health.fail(error, stage if batch is None else f"{stage} of batch {batch} ({records} records)")

    @property
    def error(self) -> EngineError | None:
        return self.health.error

    # ---- submission and the CPU stages -----------------------------------------------------------------

    def submit(self, item: Item) -> None:
        """Queues a record for fetch; blocks while `max_in_flight` records are in flight. (The bundle has checked
        the run's health just before.)"""
        while True:
            try:
                self._room.get(timeout=HEALTH_CHECK_S)
                break
            except queue.Empty:
                self.health.raise_if_failed()
        self.health.raise_if_failed()
        self._submitted.add()
        uri = item.result.record.get("uri")
        if not uri and self._task.inline_field is not None:
            self._decode_pool.submit(self._preprocess_inline, item)  # the record carries its input
            return
        if isinstance(uri, str) and is_local(uri):
            self._decode_pool.submit(self._fetch, item, True)  # a local read costs less than a hand-off
            return
        try:
            if isinstance(uri, str) and remote.serves(uri):
                self._remote_io().read(uri, functools.partial(self._fetched, item))
            else:
                self._fetch_pool.submit(self._fetch, item, False)
        except EngineError:  # stopping: the bundle fails, the record never entered
            self._left.add()
            self._room.put(None)
            raise
        except Exception as e:  # noqa: BLE001 - remote I/O could not start: the run's failure, not the record's
            self._left.add()
            self._room.put(None)
            self.fail(e, "fetch")
            self.health.raise_if_failed()

    def _remote_io(self) -> remote.RemoteIO:
        """The run's remote I/O, started on first use (a job that reads and writes only local files has none).

        Raises:
            EngineError: the run is stopping.
        """
        io = self._remote
        if io is None or self._closed:
            with self._lock:
                if self._closed:
                    raise EngineError("the engine run is stopping")
                if self._remote is None:
                    c = self._config
                    self._remote = remote.RemoteIO(
                        concurrency=c.fetch_concurrency, max_bytes=c.fetch_max_bytes,
                        retry=remote.RetryPolicy(c.io_attempts, c.io_backoff_s, timeout_s=c.io_timeout_s),
                        count=self._stats.count, busy=self._stats.busy, on_error=lambda e: self.fail(e, "remote I/O"))
                io = self._remote
        return io

    def _fetched(self, item: Item, data: bytes | None, error: BaseException | None) -> None:
        """A remote read's end, on remote I/O's loop: the bytes go to the decode pool (which releases them from
        the bound on bytes in flight), or the record fails in fetch."""
        if error is not None:
            self._record_failed_upstream(item, "fetch", error)
        else:
            self._decode_pool.submit(self._preprocess, item, data, len(data))

    def _fetch(self, item: Item, in_decode_pool: bool) -> None:
        t0 = time.perf_counter()
        try:
            data = fetch_bytes(item.result.record["uri"])
        except BaseException as e:  # noqa: BLE001 - the classifier decides who owns it
            self._record_failed_upstream(item, "fetch", e)
            return
        self._stats.busy("fetch", time.perf_counter() - t0)
        if in_decode_pool:
            self._preprocess(item, data)
        else:
            self._decode_pool.submit(self._preprocess, item, data)

    def _preprocess(self, item: Item, data: Any, held: int = 0) -> None:
        """Preprocesses the record's bytes; `held` of them are given back to remote I/O's bound afterwards."""
        t0 = time.perf_counter()
        try:
            value = self._task.preprocess(data, item.result.record)
            if type(value) is Preprocessed:
                value, item.fields = value.array, value.fields
            item.array = _numeric_array(value)
        except BaseException as e:  # noqa: BLE001
            self._record_failed_upstream(item, "preprocess", e)
            return
        finally:
            if held:
                self._remote.release(held)
        self._stats.busy("preprocess", time.perf_counter() - t0)
        self._leave_upstream(item, None)

    def _preprocess_inline(self, item: Item) -> None:
        field = self._task.inline_field
        record = item.result.record
        if field not in record:
            self._record_failed_upstream(item, "preprocess", KeyError(
                f"the record has neither a {field!r} field nor a 'uri' (fields: {sorted(map(str, record))})"))
            return
        self._preprocess(item, record[field])

    def _record_failed_upstream(self, item: Item, stage: str, error: BaseException) -> None:
        if owner_of(error, Owner.RECORD) is Owner.RECORD:
            self._leave_upstream(item, Failure.of(stage, error))
        else:
            self.fail(error, stage)

    def _leave_upstream(self, item: Item, failure: Failure | None) -> None:
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

    def _finish(self, item: Item, *, value: dict[str, Any] | None = None, failure: Failure | None = None) -> None:
        item.result.value, item.result.failure = value, failure
        item.array = item.fields = None
        item.done = True
        item.outbox.put(item.result)
        self._room.put(None)
        self._finished.add()
        if failure is not None:
            self._failed.add()

    def occupancy(self) -> dict[str, int]:
        """Where the run's records are at this moment (a telemetry sample; read without a lock, so approximate):
        in flight (submitted, not returned), upstream (in fetch or decode), ready (decoded, waiting to be batched),
        batches waiting for the forward and for the D2H wait, calls waiting for a pool's thread."""
        return {"in_flight": self._in_flight_limit - self._room.qsize(),
                "upstream": self._submitted.value - self._left.value, "ready": self._ready.qsize(),
                "waiting": self._waiting,
                "to_forward": self._to_forward.qsize(), "to_unload": self._to_unload.qsize(),
                "decode_backlog": _backlog(self._decode_pool), "fetch_backlog": _backlog(self._fetch_pool),
                "postprocess_backlog": _backlog(self._post_pool), "remote": self._remote is not None}

    @contextlib.contextmanager
    def draining_bundle(self) -> Iterator[None]:
        """While a bundle drains, the batch thread flushes partial batches as soon as nothing more is coming."""
        with self._lock:
            self._draining += 1
        self._ready.put(_WAKE)
        try:
            yield
        finally:
            with self._lock:
                self._draining -= 1

    # ---- the batch thread: collate and H2D, or the device preprocess -------------------------------------

    def _guard(self, fn: Callable[..., None], *args: Any, stage: str) -> None:
        """Runs one step of a stage thread; an error no record or batch owns fails the run (a bug) or the process."""
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - fail the waiting bundles loudly, keep the thread alive
            self.fail(e, stage)

    def _run_stage(self, inbox: queue.Queue, handle: Callable[[Any], None], outbox: queue.Queue | None,
                   stage: str) -> None:
        """Runs `handle` on every message until _STOP, then passes _STOP on."""
        for msg in iter(inbox.get, _STOP):
            self._guard(handle, msg, stage=stage)
        if outbox is not None:
            outbox.put(_STOP)

    def _batch_thread(self) -> None:
        try:
            self._batch_loop()
        except BaseException as e:  # noqa: BLE001 - a bug here: waiting bundles raise instead of hanging
            self.fail(e, "batch")
        finally:
            self._to_forward.put(_STOP)

    def _batcher(self) -> Batcher[Item] | LengthBatcher[Item]:
        c = self._config
        if self._task.pad_value is None:
            return Batcher(c.batch_size, c.max_batch_wait_s)
        # An explicit max_in_flight below the window would keep it from filling: the window is what the bound
        # leaves beside eight batches on their way through the device (EngineConfig.in_flight_limit_for).
        window = min(c.bucket_batches * c.batch_size, max(c.batch_size, self._in_flight_limit - 8 * c.batch_size))
        return LengthBatcher(c.batch_size, c.max_batch_wait_s, _length, window=window, max_tokens=c.max_tokens,
                             pad_multiple=c.pad_multiple)

    def _batch_loop(self) -> None:
        """Batches ready records by size, by age, or when a draining bundle waits on nothing else.

        A length batcher chooses better the more records it sees: it takes in every ready record before it chooses,
        and while the forward already has batches waiting (the device is the bottleneck), a batch due by age waits
        for room there (the forward wakes it when it takes a batch), with the records that arrived meanwhile; the
        device does not wait for it.
        """
        batcher = self._batcher()
        choosy = isinstance(batcher, LengthBatcher)
        burst = self._in_flight_limit if choosy else self._config.batch_size
        while True:
            wait = batcher.time_left()
            self._deferring = wait == 0.0 and choosy and self._to_forward.full() and not self._ended()
            if self._deferring:
                wait = _RECHECK_S  # the forward's wake-up comes first; this is a backstop
            try:
                msgs = [self._ready.get(timeout=wait)]
            except queue.Empty:
                msgs = []  # a batch is due by age, or it is time to look again
            while len(msgs) < burst and not self._ready.empty():
                msgs.append(self._ready.get())  # whatever else is ready: one wake-up per burst, not per record
            for msg in msgs:
                if msg is _STOP:  # the last message: the pools upstream have stopped
                    self._launch_all(batcher.take_all())
                    return
                if msg is not _WAKE:
                    self._launch_all(batcher.add(msg))
            while batcher.time_left() == 0.0 and not (choosy and self._to_forward.full() and not self._ended()):
                self._launch_all(batcher.take_due())  # due by age (also while records keep coming)
            if len(batcher) and self._draining > 0 and self._nothing_upstream() and self._ready.empty():
                self._launch_all(batcher.take_all())
            self._waiting = len(batcher)

    def _launch_all(self, batches: list[list[Item]]) -> None:
        for items in batches:
            self._guard(self._launch, items, stage="batch")

    def _launch(self, items: list[Item]) -> None:
        """Moves a batch to the device (collate + H2D copy, or the task's device preprocess), then queues it."""
        if not items or self._ended():
            return
        if self._task.device_preprocess is not None:
            self._preprocess_on_device(items)
            return
        good = self._same_shape(items)
        step = self._engine.row_limits.get("h2d") or len(good)
        for lo in range(0, len(good), step):  # after an out-of-memory error in H2D, in parts that fit
            self._copy_in(good[lo:lo + step])

    def _same_shape(self, items: list[Item]) -> list[Item]:
        """The items shaped like most of the batch (so one odd record cannot fail the others); each other one
        fails in collate. Variable-length inputs (pad_value) need only agree past their first dimension."""
        variable = self._task.pad_value is not None
        kinds = [(_row_shape(item.array, variable), item.array.dtype) for item in items]
        if kinds.count(kinds[0]) == len(kinds):  # the usual batch: no record to fail
            return items
        (shape, dtype), _ = collections.Counter(kinds).most_common(1)[0]
        good = []
        for item, kind in zip(items, kinds, strict=True):
            if kind != (shape, dtype):
                self._finish(item, failure=Failure(
                    "collate", "ValueError", f"preprocessed {_describe(*kind, variable)} differs from the batch's "
                                             f"{_describe(shape, dtype, variable)}"))
            else:
                good.append(item)
        return good

    def _copy_in(self, items: list[Item]) -> bool:
        """Stacks the items' arrays into a pinned host buffer, starts its copy on the H2D stream and queues the
        batch for forward. An out-of-memory error in the copy halves it.

        Returns:
            Whether every item went on to forward.
        """
        if self._ended():
            return False
        t0 = time.perf_counter()
        stage, lease = "collate", None
        try:
            waited = time.perf_counter()
            arrays = [item.array for item in items]
            shape, dtype = arrays[0].shape, torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
            pad = self._task.pad_value
            if pad is not None:  # each batch pads to its own longest
                shape = (padded_length(max(a.shape[0] for a in arrays), self._config.pad_multiple), *shape[1:])
            lease = self.input_buffers.acquire((len(items), *shape), dtype)
            waited = time.perf_counter() - waited  # backpressure: every buffer still in use; not collate's work
            _collate(arrays, lease.tensor.numpy(), pad)
            t1 = time.perf_counter()
            stage = "h2d"
            start = self._trace_start()
            device_input = self._to_device(lease.tensor)
            h2d_done = self._streams.record(self._streams.h2d)
        except BaseException as e:  # noqa: BLE001 - the classifier decides who owns it
            if lease is not None:
                lease.release()  # nothing was copied from it, or the copy failed
            halve = stage == "h2d" and is_out_of_memory(e) and len(items) > 1
            if not halve:
                self._batch_failed(items, stage, e, self._engine.next_batch_number())
                return False
        else:
            number = self._engine.next_batch_number()
            if pad is not None:  # what the padding costs: elements copied and run, against the records' own
                self._stats.count("padded_tokens", lease.tensor.shape[0] * lease.tensor.shape[1])
                self._stats.count("tokens", sum(a.shape[0] for a in arrays))
            self._stats.busy("collate", t1 - t0 - waited)
            self._stats.busy("h2d", time.perf_counter() - t1)
            self._trace(number, "h2d", start, h2d_done)
            self._to_forward.put(Batch(number, items, lease, device_input, h2d_done))
            return True
        # Out of the except clause, so that its traceback frees what the failed copy held (see chunks._bisect).
        torch.cuda.empty_cache()
        _LOG.warning("beam_infer: CUDA out of memory copying %d records to the device; in halves", len(items))
        half = len(items) // 2
        first, second = self._copy_in(items[:half]), self._copy_in(items[half:])
        if first and second:  # the size, not a record: later batches go in smaller parts
            self._engine.row_limits.lower("h2d", len(items))
        return first and second

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Starts the copy of a pinned host batch to the device on the H2D stream (on the CPU: the batch itself)."""
        with self._streams.on(self._streams.h2d):
            return host.to(self._engine.device, non_blocking=True)

    def _trace_start(self) -> torch.cuda.Event | None:
        """With trace_events, an event on the H2D stream where the batch's device work starts (after the host's)."""
        return self._streams.record(self._streams.h2d) if self._config.trace_events else None

    def _trace(self, number: int, stage: str, start: torch.cuda.Event | None, end: torch.cuda.Event | None) -> None:
        if start is not None:
            self._engine.trace.append((number, stage, start, end))

    def _preprocess_on_device(self, items: list[Item]) -> None:
        """Hands the batch's arrays, as CPU tensors, to the task's device preprocess on the H2D stream."""
        number = self._engine.next_batch_number()
        t0 = time.perf_counter()
        preprocess = self._task.device_preprocess
        h2d = self._streams.h2d

        def call(xs: list[torch.Tensor]) -> tuple[torch.Tensor]:
            # A device decoder may write from a stream of its own (torchvision's nvJPEG does) into memory that
            # the caching allocator freed on the H2D stream: the work queued there (the previous batch's, or
            # this batch's earlier chunks after a bisection or an out-of-memory split) must be over first.
            self._streams.drain(h2d)
            return (preprocess(xs, self._engine.device),)

        try:
            start = self._trace_start()
            with self._streams.on(h2d):
                encoded = [torch.from_numpy(item.array) for item in items]
                chunks, failures = call_in_chunks(call, encoded, len(items), "device_preprocess",
                                                  self._engine.row_limits)
                device_input = concat_chunks(chunks)[0] if chunks else None  # on the H2D stream: h2d_done covers it
            h2d_done = self._streams.record(h2d)
        except BaseException as e:  # noqa: BLE001 - not one record's fault: the batch's records fail, or the run
            self._batch_failed(items, "device_preprocess", e, number)
            return
        for index, failure in failures:
            self._finish(items[index], failure=failure)
        good = [items[i] for a, b, _ in chunks for i in range(a, b)]
        self._stats.busy("device_preprocess", time.perf_counter() - t0)
        self._trace(number, "device_preprocess", start, h2d_done)
        if good:
            self._to_forward.put(Batch(number, good, None, device_input, h2d_done))

    # ---- the forward thread: forward and D2H ------------------------------------------------------------

    def _forward(self, batch: Batch) -> None:
        """Runs the model on the compute stream once the batch's copy is done, then starts the D2H copy."""
        stage = "forward"
        if self._deferring:  # a slot at the forward is free now: the batch thread may launch its due batch
            self._ready.put(_WAKE)
        if self._ended():
            self._release_input(batch)
            batch.device_input = None
            return
        try:
            outputs, forward_done = self._run_model(batch)
            stage = "d2h"
            self._copy_out(batch, outputs, forward_done)
        except BaseException as e:  # noqa: BLE001 - outside any one record (joining outputs, a copy)
            _release(batch.out_leases, self._streams, self._streams.d2h)  # copies into them may be in flight
            self._batch_failed(batch.items, stage, e, batch.number)
            return
        finally:
            self._release_input(batch)
            batch.device_input = None  # the compute and D2H streams hold it (record_stream) as long as they need
        self._to_unload.put(batch)

    def _release_input(self, batch: Batch) -> None:
        if batch.lease is not None:
            batch.lease.release(fence=batch.h2d_done)  # on the CPU the forward has read it (outputs are unaliased)

    def _run_model(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event | None]:
        s = self._streams
        t0 = time.perf_counter()
        s.wait(s.compute, batch.h2d_done)
        start = s.record(s.compute) if self._config.trace_events else None
        with s.on(s.compute), torch.inference_mode():
            s.keep_for(batch.device_input, s.compute)
            x = batch.device_input
            if x.is_floating_point() and x.dtype != self._engine.dtype:
                x = x.to(self._engine.dtype)  # inputs follow the model's dtype; integers stay (the model scales them)
            chunks, failures = call_in_chunks(self._engine.model, x, len(batch.items), "forward",
                                              self._engine.row_limits)
            for index, failure in failures:
                self._finish(batch.items[index], failure=failure)
            batch.rows = [i for a, b, _ in chunks for i in range(a, b)]
            outputs = concat_chunks(chunks)
            if not s.cuda:  # an output that is a view of the input would see the next batch collated into it
                outputs = tuple(unaliased(out, batch.device_input) for out in outputs)
        forward_done = s.record(s.compute)
        self._trace(batch.number, "forward", start, forward_done)
        self._release_input(batch)  # before the D2H copy: the batch thread may collate the next batch into it
        self._stats.busy("forward", time.perf_counter() - t0)
        return outputs, forward_done

    def _copy_out(self, batch: Batch, outputs: tuple[torch.Tensor, ...], forward_done: Any) -> None:
        """Starts the copy of the outputs into pinned host buffers on the D2H stream, after the forward."""
        s = self._streams
        if s.cuda and outputs:
            if self.output_buffers is None or self._outputs_per_batch < len(outputs):
                self._outputs_per_batch = len(outputs)
                self.output_buffers = BufferPool(self._config.host_buffers * len(outputs), pin=True)
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

    def _batch_failed(self, items: list[Item], stage: str, error: BaseException, number: int) -> None:
        """An error of a whole batch that no record alone caused: each of its records not yet finished fails, or,
        for an error no batch owns (a device fault), the run."""
        if owner_of(error, Owner.BATCH) is not Owner.BATCH:
            self.fail(error, stage, number, len(items))
            return
        _LOG.warning("beam_infer: batch %d of %d records failed in %s: %r", number, len(items), stage, error)
        failure = Failure.of(stage, error)
        for item in items:
            if not item.done:
                self._finish(item, failure=failure)

    # ---- the unload thread and the postprocess pool -------------------------------------------------------

    def _unload(self, batch: Batch) -> None:
        """Waits for the D2H copy, hands each record's output rows to the postprocess pool.

        The rows are views of the pinned output buffers (no copy); the buffers go back to their pool once
        every postprocess call of the batch has returned.
        """
        t0 = time.perf_counter()
        items = [batch.items[i] for i in batch.rows]
        try:
            self._streams.synchronize(batch.d2h_done)
            arrays = [as_numpy(out) for out in batch.outputs]
        except BaseException as e:  # noqa: BLE001 - the batch's records fail, or the run
            _release(batch.out_leases)
            self._batch_failed(items, "d2h", e, batch.number)
            return
        self._stats.busy("d2h", time.perf_counter() - t0)
        self._stats.batch(len(batch.items))
        step = max(1, -(-len(items) // self._config.postprocess_threads))
        spans = [(lo, min(lo + step, len(items))) for lo in range(0, len(items), step)]
        release = ReleaseAfter(len(spans), batch.out_leases)
        for lo, hi in spans:
            self._post_pool.submit(self._postprocess, items[lo:hi], [x[lo:hi] for x in arrays], release)

    def _postprocess(self, items: list[Item], arrays: list[np.ndarray], release: ReleaseAfter) -> None:
        t0 = time.perf_counter()
        done: list[tuple[Item, dict[str, Any] | None, Failure | None]] = []
        try:
            for row, item in enumerate(items):
                try:
                    record = item.result.record if item.fields is None else {**item.result.record, **item.fields}
                    value = self._task.postprocess(tuple(x[row] for x in arrays), record)
                    if type(value) is not dict:  # the usual case costs one type check
                        if not isinstance(value, Mapping):
                            raise TypeError(f"postprocess must return a mapping of output fields, got "
                                            f"{type(value).__name__}: {reprlib.repr(value)}")
                        value = dict(value)
                    done.append((item, release.detach(value, arrays), None))
                except BaseException as e:  # noqa: BLE001
                    if owner_of(e, Owner.RECORD) is not Owner.RECORD:
                        self.fail(e, "postprocess")
                        return
                    done.append((item, None, Failure.of("postprocess", e)))
        finally:
            release.done()
        self._stats.busy("postprocess", time.perf_counter() - t0)  # before the bundles can see their results
        for item, value, failure in done:
            if value is not None and Blob in map(type, value.values()):
                self._put(item, value)
            else:
                self._finish(item, value=value, failure=failure)

    # ---- the put stage ----------------------------------------------------------------------------------

    def _put(self, item: Item, value: dict[str, Any]) -> None:
        """Writes the record's Blobs, each field becoming its URI: local files here (temporary name, then rename),
        gs://, s3:// and http(s):// through remote I/O, other URLs with a blocking fsspec write. The record
        finishes once the last write ends; if any failed, as a dead letter of stage "put" with the first error
        (objects already written stay: each is whole, and a retry of the record rewrites them)."""
        t0 = time.perf_counter()
        remote_blobs = []
        try:
            for key, blob in value.items():
                if type(blob) is not Blob:
                    continue
                value[key] = blob.uri
                if is_local(blob.uri) or blob.uri.startswith("file://"):
                    write_local_atomically(blob.uri, blob.data)
                elif remote.serves(blob.uri):
                    remote_blobs.append(blob)
                else:
                    with open_uri(blob.uri, "wb") as f:
                        f.write(blob.data)
        except BaseException as e:  # noqa: BLE001
            self._stats.busy("put", time.perf_counter() - t0)
            self._record_failed(item, "put", e)
            return
        self._stats.busy("put", time.perf_counter() - t0)
        if not remote_blobs:
            self._finish(item, value=value)
            return
        written = _Writes(len(remote_blobs), functools.partial(self._written, item, value))
        try:
            io = self._remote_io()
        except EngineError:
            return  # stopping: the record's bundle fails
        for blob in remote_blobs:
            io.write(blob.uri, blob.data, written.one_done)

    def _written(self, item: Item, value: dict[str, Any], error: BaseException | None) -> None:
        if error is None:
            self._finish(item, value=value)
        else:
            self._record_failed(item, "put", error)

    def _record_failed(self, item: Item, stage: str, error: BaseException) -> None:
        """A record's own failure in `stage` after the batch: its dead letter, unless no record owns the error."""
        if owner_of(error, Owner.RECORD) is Owner.RECORD:
            self._finish(item, failure=Failure.of(stage, error))
        else:
            self.fail(error, stage)


class _Writes:
    """Counts down a record's remote writes (their callbacks all run on remote I/O's one thread); the last calls
    `done` with the first error, or None."""

    def __init__(self, count: int, done: Callable[[BaseException | None], None]) -> None:
        self._left = count
        self._error: BaseException | None = None
        self._done = done

    def one_done(self, error: BaseException | None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._left -= 1
        if self._left == 0:
            self._done(self._error)


def _numeric_array(value: Any) -> np.ndarray:
    """A preprocess's output as a contiguous numpy array of numbers, or a TypeError naming what it was."""
    array = np.ascontiguousarray(value)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"preprocess must return an array of numbers, got {type(value).__name__} "
                        f"({array.dtype}): {reprlib.repr(value)}")
    if not array.dtype.isnative:  # big-endian, say: torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _length(item: Item) -> int:
    """A variable-length input's length: its first dimension (a preprocessed array has at least one)."""
    return item.array.shape[0]


def _row_shape(array: np.ndarray, variable: bool) -> tuple[Any, ...]:
    return (array.ndim, array.shape[1:]) if variable else array.shape


def _describe(shape: tuple[Any, ...], dtype: np.dtype, variable: bool) -> str:
    if not variable:
        return f"shape {shape} {dtype}"
    ndim, rest = shape
    return f"{ndim}-d {dtype} array" + (f" of rows shaped {rest}" if rest else "")


def _collate(arrays: list[np.ndarray], out: np.ndarray, pad: float | None) -> None:
    """Stacks `arrays` into `out`; with `pad`, each at the start of its row and the rest of the row `pad`.

    Raises:
        ValueError: `pad` is not exactly representable in the arrays' dtype (-1 in uint8, 0.5 in int32): the
            model could not tell padding from input.
    """
    if pad is None:
        np.stack(arrays, out=out)
        return
    with np.errstate(invalid="ignore"):
        fits = np.array(pad).astype(out.dtype) == pad
    if not fits or (out.dtype == np.bool_ and not isinstance(pad, (bool, np.bool_))):
        raise ValueError(f"pad_value {pad!r} is not a {out.dtype} value: the model could not tell padding from input")
    out.fill(pad)
    for row, array in zip(out, arrays, strict=True):
        row[:array.shape[0]] = array


def _backlog(pool: Workers | None) -> int:
    return pool.backlog if pool is not None else 0


def _release(leases: list[Lease], streams: Any = None, stream: Any = None) -> None:
    """Gives `leases` back, fenced by the work queued so far on `stream` (none when the device cannot say)."""
    fence = None
    if stream is not None:
        with contextlib.suppress(BaseException):  # a broken device: the error that got us here is reported
            fence = streams.record(stream)
    for lease in leases:
        lease.release(fence=fence)
