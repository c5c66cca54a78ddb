"""RemoteIO: remote reads and writes as coroutines on one event-loop thread, bounded, timed out and retried.

An object store answers a GET in 20-50 ms, so feeding a GPU at thousands of images/s takes hundreds of requests
in flight: as many blocking threads would fight over the GIL, while gcsfs, s3fs and fsspec's http client are
async-native and one thread holds them all. Per RemoteIO:

- at most `concurrency` reads and `concurrency` writes in flight, and no new read starts while `max_bytes` of
  read data wait for their consumer to `release` them (sizes are unknown until read, so the reads already under
  way when the bound is reached still complete: it is passed by at most `concurrency` objects);
- every request has a timeout; transient failures (408, 429, 5xx, a dropped or reset connection, a truncated
  body, a timeout) are retried with exponential backoff and full jitter; permanent ones (404, 403, 400, …) fail
  at once. The final error is a RemoteIOError naming the URI, the HTTP status where there is one, and the attempts;
- gcsfs's own retry loop (6 tries, sleeps of 1-32 s, uncounted) is turned off, so this policy is the only one
  (s3fs and botocore keep theirs: they run inside each attempt);
- gs:// uses gcsfs's core filesystem, not its experimental zonal/HNS one: single-request uploads (an object is
  complete under its name or absent) and no storage-layout gRPC call per bucket;
- each filesystem gets a connection pool as large as the two directions' concurrency (aiohttp's default is 100,
  aiobotocore's 10).

Filesystems without an async implementation (memory://, local files) are not served here: `serves` says which.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import fsspec

from beam_infer.io.gcs_env import gcsfs_storage_options, prepare_gcsfs

_LOG = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRORS = (TimeoutError, ConnectionError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EREMOTEIO})  # s3fs's translations of 503 SlowDown and of 500
_CANCEL_WAIT_S = 2.0  # closing: how long cancelled requests, then each session, get to end
_ASYNC_PROTOCOLS: dict[str, bool] = {}  # protocol -> whether fsspec has an async implementation for it


def serves(uri: str) -> bool:
    """Whether RemoteIO reads and writes `uri`: a URL whose fsspec filesystem is async (gs://, s3://, http(s)://)."""
    protocol = uri.partition("://")[0]
    known = _ASYNC_PROTOCOLS.get(protocol)
    if known is None:
        prepare_gcsfs()  # before gcsfs is imported
        try:
            known = bool(getattr(fsspec.get_filesystem_class(protocol), "async_impl", False))
        except (ValueError, ImportError):  # unknown protocol, or its package missing: the thread pool reports it
            known = False
        except Exception:  # noqa: BLE001 - a package that fails to import (a protobuf mismatch, say): likewise
            _LOG.warning("beam_infer: the fsspec filesystem for %s:// failed to load", protocol, exc_info=True)
            known = False
        _ASYNC_PROTOCOLS[protocol] = known
    return known


class RemoteIOError(OSError):
    """A remote read or write that failed for good: a permanent error, or a transient one on every attempt."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return RemoteIOError, (str(self), self.status, self.attempts)


def status_of(error: BaseException) -> int | None:
    """The HTTP status behind an fsspec filesystem's error, where it can be told."""
    if isinstance(error, FileNotFoundError):
        return 404
    if isinstance(error, PermissionError):
        return 403
    for name in ("status", "code"):  # aiohttp's ClientResponseError.status, gcsfs's HttpError.code
        value = getattr(error, name, None)
        if isinstance(value, (int, str)) and str(value).isdigit() and 100 <= int(value) < 600:
            return int(value)
    message = str(error)
    if isinstance(error, OSError) and message.startswith("Forbidden"):  # gcsfs's 403
        return 403
    if isinstance(error, ValueError) and message.startswith("Bad Request"):  # gcsfs's 400
        return 400
    if type(error).__name__ == "ProxyError":  # gcsfs's 502
        return 502
    return None


def is_transient(error: BaseException) -> bool:
    """Whether trying again may succeed: a 408, 429 or 5xx status, a connection error, a truncated body, a timeout,
    an access token that failed to refresh (gcsfs's 401 "Invalid Credentials", google-auth's refresh and transport
    errors, as gcsfs's own retry policy has it)."""
    status = status_of(error)
    if status == 401:
        return "Invalid Credentials" in str(error)
    if status is not None:
        return status in TRANSIENT_STATUSES
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    if type(error).__name__ in ("RefreshError", "TransportError") and "google.auth" in type(error).__module__:
        return True
    return isinstance(error, _TRANSIENT_ERRORS)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per request, the backoff between them (attempt n waits uniformly up to min(max_backoff_s,
    backoff_s × 2^(n-1)): "full jitter", so clients that failed together do not retry together), and the
    timeout of each attempt."""

    attempts: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 10.0
    timeout_s: float = 60.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)))


def _describe(verb: str, uri: str, error: BaseException, status: int | None, attempts: int) -> str:
    cause = f"{type(error).__name__}: {str(error).strip() or repr(error)}"
    what = f"HTTP {status} ({cause})" if status is not None else cause
    tries = "not retried" if attempts == 1 and not is_transient(error) else f"after {attempts} attempt(s)"
    return f"{verb} {uri} failed: {what}; {tries}"


def _gcs_filesystem_class() -> type:
    """gcsfs's core filesystem with one try per request (this module retries), or gcsfs's own retrying one if
    that cannot be had."""
    from gcsfs.core import GCSFileSystem

    request = getattr(GCSFileSystem._request, "__wrapped__", None)  # undecorated by gcsfs's retry_request
    if request is None:
        _LOG.warning("beam_infer: gcsfs's request retries could not be turned off; they run inside beam_infer's")
        return GCSFileSystem

    class OneTryGCSFileSystem(GCSFileSystem):
        _request = request

    return OneTryGCSFileSystem


def open_async_filesystem(protocol: str, connector: aiohttp.BaseConnector, connections: int) -> Any:
    """A fresh async fsspec filesystem for `protocol` (not fsspec's shared instance, which has its own loop): its
    session is made on first use, in the loop that uses it, over `connector` (s3fs: a pool of `connections`).
    For gs:// under STORAGE_EMULATOR_HOST, anonymous: an emulator takes no credentials, and looking for them
    waits on the metadata server. Blocking (credential look-ups): call it off the event loop."""
    options: dict[str, Any] = {}
    if protocol in ("gs", "gcs"):
        cls = _gcs_filesystem_class()
        options.update(session_kwargs={"connector": connector}, **gcsfs_storage_options())
    else:
        cls = fsspec.get_filesystem_class(protocol)
        if protocol in ("http", "https"):
            options["client_kwargs"] = {"connector": connector}
        elif protocol in ("s3", "s3a"):
            options["config_kwargs"] = {"max_pool_connections": connections}
    return cls(asynchronous=True, skip_instance_cache=True, **options)


class RemoteIO:
    """Reads and writes remote objects on an event-loop thread of its own; `close` ends it.

    `read` and `write` return at once and may be called from any thread; their `done` callbacks run on the loop's
    thread and must not block. `count(name, n)` and `busy(stage, seconds)` receive the retries and failures
    ("fetch_retries", "put_failures", …) and each request's seconds (all attempts: latency, summed over the
    requests in flight), stage "fetch" or "put". `on_error(error)` receives what no record owns: a callback that
    raised, a request cancelled while the loop was not closing.
    """

    def __init__(self, *, concurrency: int, max_bytes: int, retry: RetryPolicy,
                 count: Callable[[str, int], None], busy: Callable[[str, float], None],
                 on_error: Callable[[BaseException], None]) -> None:
        self._retry = retry
        self._count = count
        self._busy = busy
        self._on_error = on_error
        self._connections = 2 * concurrency  # reads and writes share a filesystem's connection pool
        self._max_bytes = max_bytes
        self._held = 0  # bytes read and not yet released
        self._held_lock = threading.Lock()
        self._rng = random.Random()
        self._filesystems: dict[str, Any] = {}  # protocol -> filesystem, or the error its construction raised
        self._connectors: list[aiohttp.BaseConnector] = []
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._read_slots = asyncio.Semaphore(concurrency)
        self._write_slots = asyncio.Semaphore(concurrency)
        self._byte_room = asyncio.Event()
        self._byte_room.set()
        self._opening = asyncio.Lock()  # one filesystem construction at a time
        self._shutting_down: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run_loop, name="beam_infer-remote", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            self._loop.close()
            raise

    # ---- any thread ------------------------------------------------------------------------------------

    def read(self, uri: str, done: Callable[[bytes | None, BaseException | None], None]) -> None:
        """Starts reading `uri`; then `done(data, None)`, or `done(None, RemoteIOError)`. The caller releases
        len(data) once it no longer holds the data. Does nothing once closing (nor calls `done`)."""
        self._soon(self._start, self._read, uri, done)

    def write(self, uri: str, data: bytes, done: Callable[[BaseException | None], None]) -> None:
        """Starts writing `data` to `uri` as one object (a single upload: complete under its name, or absent);
        then `done(None)`, or `done(RemoteIOError)`. Does nothing once closing (nor calls `done`)."""
        self._soon(self._start, self._write, uri, data, done)

    def release(self, nbytes: int) -> None:
        """Gives back `nbytes` of read data to the bound on bytes in flight."""
        with self._held_lock:
            self._held -= nbytes
            wake = self._held < self._max_bytes and not self._byte_room.is_set()
        if wake:
            self._soon(self._byte_room.set)

    def begin_close(self) -> None:
        """Starts closing without waiting: requests in flight are cancelled (no `done` is called for them), the
        clients' sessions closed, and the loop stopped. `join` waits for it."""
        if self._closed:
            return
        self._closed = True
        self._soon(self._start_shutdown, force=True)

    def join(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for the loop's thread to end after begin_close (the thread closes the loop
        when it ends, also later). Returns whether it ended."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def close(self, timeout_s: float) -> bool:
        """begin_close, then join."""
        self.begin_close()
        return self.join(timeout_s)

    def _soon(self, fn: Callable[..., Any], *args: Any, force: bool = False) -> None:
        if self._closed and not force:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed meanwhile: closing drops requests anyway
            pass

    # ---- the loop's thread -----------------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()  # shuts its default executor down without waiting for a stuck construction

    def _start(self, request: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._closed:
            return
        task = self._loop.create_task(request(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_shutdown(self) -> None:
        self._shutting_down = self._loop.create_task(self._shutdown())  # a reference: the loop's is weak

    async def _read(self, uri: str, done: Callable[[bytes | None, BaseException | None], None]) -> None:
        try:
            async with self._read_slots:
                while not self._byte_room.is_set():  # checked holding a slot: reads queued for one wait here too
                    await self._byte_room.wait()
                data = await self._call("fetch", "GET", uri, lambda fs, path: fs._cat_file(path))
            with self._held_lock:
                self._held += len(data)
                if self._held >= self._max_bytes:
                    self._byte_room.clear()
        except asyncio.CancelledError as e:
            if self._closed:
                raise  # the run that asked is stopping, and its bundles fail without this record
            self._report(e)
            return
        except Exception as e:  # noqa: BLE001 - the caller's record owns it
            self._call_back(done, None, e)
            return
        self._call_back(done, data, None)

    async def _write(self, uri: str, data: bytes, done: Callable[[BaseException | None], None]) -> None:
        try:
            async with self._write_slots:
                await self._call("put", "PUT", uri, lambda fs, path: fs._pipe_file(path, data))
        except asyncio.CancelledError as e:
            if self._closed:
                raise
            self._report(e)
            return
        except Exception as e:  # noqa: BLE001
            self._call_back(done, e)
            return
        self._call_back(done, None)

    async def _call(self, stage: str, verb: str, uri: str, request: Callable[[Any, str], Any]) -> Any:
        """`request(fs, path)`, timed out and retried by the policy; a RemoteIOError once it fails for good."""
        t0 = time.perf_counter()
        try:
            try:
                fs = await asyncio.wait_for(self._filesystem(uri.partition("://")[0]), self._retry.timeout_s)
            except Exception as e:  # noqa: BLE001 - no client, so no request: the record's failure
                self._count(f"{stage}_failures", 1)
                raise RemoteIOError(f"{verb} {uri} failed: no client for it ({type(e).__name__}: {e})") from e
            path = fs._strip_protocol(uri)
            for attempt in range(1, self._retry.attempts + 1):
                try:
                    return await asyncio.wait_for(request(fs, path), self._retry.timeout_s)
                except Exception as e:  # noqa: BLE001 - sorted below
                    error = e
                if attempt == self._retry.attempts or not is_transient(error):
                    self._count(f"{stage}_failures", 1)
                    status = status_of(error)
                    raise RemoteIOError(_describe(verb, uri, error, status, attempt), status, attempt) from error
                self._count(f"{stage}_retries", 1)
                await asyncio.sleep(self._retry.delay(attempt, self._rng))
            raise AssertionError("unreachable")
        finally:
            self._busy(stage, time.perf_counter() - t0)

    async def _filesystem(self, protocol: str) -> Any:
        """The filesystem for `protocol`, made once, off the loop (making one may look up credentials); a
        construction that failed raises its error again for every request."""
        fs = self._filesystems.get(protocol)
        if fs is None:
            async with self._opening:
                fs = self._filesystems.get(protocol)
                if fs is None:
                    connector = aiohttp.TCPConnector(limit=self._connections)
                    self._connectors.append(connector)
                    try:
                        fs = await asyncio.to_thread(open_async_filesystem, protocol, connector, self._connections)
                    except Exception as e:  # noqa: BLE001 - kept, so each request fails fast with it
                        fs = e
                    self._filesystems[protocol] = fs  # a construction that timed out is not kept: tried again
        if isinstance(fs, Exception):
            raise fs
        return fs

    async def _shutdown(self) -> None:
        try:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:  # bounded: a request that does not end on cancellation must not keep the loop alive
                _, pending = await asyncio.wait(tasks, timeout=_CANCEL_WAIT_S)
                if pending:
                    _LOG.warning("beam_infer: %d remote request(s) did not end within %.1fs of being cancelled; "
                                 "dropped with the loop", len(pending), _CANCEL_WAIT_S)
            for fs in self._filesystems.values():
                session = getattr(fs, "_session", None)  # gcsfs's and fsspec http's aiohttp session
                if session is not None and not session.closed:
                    await asyncio.wait_for(session.close(), _CANCEL_WAIT_S)
                s3 = getattr(fs, "_s3", None)  # s3fs's aiobotocore client
                if s3 is not None:
                    await asyncio.wait_for(s3.close(), _CANCEL_WAIT_S)
            for connector in self._connectors:
                await asyncio.wait_for(connector.close(), _CANCEL_WAIT_S)
        except Exception as e:  # noqa: BLE001 - a session that fails to close is not worth failing a stop for
            _LOG.warning("beam_infer: closing remote I/O: %r", e)
        finally:
            self._loop.stop()

    def _call_back(self, done: Callable[..., None], *args: Any) -> None:
        try:
            done(*args)
        except Exception as e:  # noqa: BLE001 - a callback's bug: its record would never return
            self._report(e)

    def _report(self, error: BaseException) -> None:
        try:
            self._on_error(error)
        except Exception:  # noqa: BLE001
            _LOG.exception("beam_infer: remote I/O could not report %r", error)


