"""FaultProxy: a reverse proxy on loopback that puts latency and faults between a client and a GcsServer.

It runs aiohttp on its own event loop in a daemon thread, so a synchronous test (or a Beam pipeline running
in the test's process) can use it. Every request is forwarded as it came (method, raw path and query,
headers, streamed body) and the response is streamed back, except that, drawn per request from a seeded
random.Random, it may instead be answered with a GCS-style 503 or 429, cut off without a response (the
client sees a disconnect), or have its body sent in two parts with a pause between them. A fixed latency is
added to every request. The fault rates are exclusive: each request gets at most one fault, each with its own
rate, so they may add up to at most 1.

One request is changed on its way: a JSON API batch (POST /batch/storage/v1) gets a Content-ID header in
each part that has none. google-cloud-storage sends none, and fake-gcs-server skips every part without one
and answers an empty multipart body, which the client rejects ("Bad response: not multi-part"): without this,
Beam's gs:// rename and delete (both batches) fail on the emulator.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import random
import socket
import threading

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

FAULTS = ("error_503", "error_429", "drop", "slow_body")
_ERRORS = {"error_503": (503, "backendError", "Service Unavailable"),
           "error_429": (429, "rateLimitExceeded", "Too Many Requests")}
# Headers about one connection, not the request: the proxy's own connections set them.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "trailers", "transfer-encoding", "upgrade", "host", "expect"})
_SLOW_BODY_HEAD = 64  # bytes of a slow body sent before the pause
_SHUTDOWN_TIMEOUT_S = 1.0  # how long stop() lets requests in flight finish


class FaultProxy:
    """Forwards http://127.0.0.1:PORT (`url`) to `target`, injecting latency and faults (see `configure`).

    `counts` has the number of requests seen ("requests") and of each fault injected (the names in FAULTS).
    """

    def __init__(self, target: str, *, latency_s: float = 0.0, error_503: float = 0.0, error_429: float = 0.0,
                 drop: float = 0.0, slow_body: float = 0.0, slow_body_s: float = 1.0, seed: int = 0,
                 backlog: int = 1024) -> None:
        self.target = target.rstrip("/")
        self.backlog = backlog
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("requests", *FAULTS), 0)
        self._rates = dict.fromkeys(FAULTS, 0.0)
        self._latency_s = 0.0
        self._slow_body_s = 0.0
        self._random = random.Random()
        self.configure(latency_s=latency_s, error_503=error_503, error_429=error_429, drop=drop,
                       slow_body=slow_body, slow_body_s=slow_body_s, seed=seed)
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def configure(self, *, latency_s: float | None = None, error_503: float | None = None,
                  error_429: float | None = None, drop: float | None = None, slow_body: float | None = None,
                  slow_body_s: float | None = None, seed: int | None = None) -> None:
        """Changes the given settings (None: unchanged) for the requests that arrive from now on.

        Rates are probabilities in [0, 1] whose sum is at most 1; `seed` restarts the random draws.
        """
        given = {"error_503": error_503, "error_429": error_429, "drop": drop, "slow_body": slow_body}
        with self._lock:
            rates = {**self._rates, **{name: rate for name, rate in given.items() if rate is not None}}
            if not all(0.0 <= rate <= 1.0 for rate in rates.values()) or sum(rates.values()) > 1.0 + 1e-9:
                raise ValueError(f"fault rates must be in [0, 1] and add up to at most 1: {rates}")
            for name, value in (("latency_s", latency_s), ("slow_body_s", slow_body_s)):
                if value is not None and value < 0:
                    raise ValueError(f"{name} must be >= 0: {value}")
            self._rates = rates
            if latency_s is not None:
                self._latency_s = latency_s
            if slow_body_s is not None:
                self._slow_body_s = slow_body_s
            if seed is not None:
                self._random.seed(seed)

    @property
    def counts(self) -> dict[str, int]:
        """A snapshot of the counters."""
        with self._lock:
            return dict(self._counts)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Binds a free port and starts serving; returns once requests are accepted."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="gcs-fault-proxy",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("FaultProxy failed to start") from self._error
        return self

    def stop(self) -> None:
        """Stops serving (requests in flight get _SHUTDOWN_TIMEOUT_S to finish), closes the upstream session
        and joins the thread; idempotent."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=0)  # no limit on the size of request bodies
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        try:
            await runner.setup()
            await web.SockSite(runner, self._sock, backlog=self.backlog).start()
        except BaseException as error:
            self._error = error
            self._ready.set()
            await runner.cleanup()
            raise
        # No connection limit (the default is 100), no decompression: bytes pass through as they came.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                              skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"))
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def _draw(self) -> tuple[str | None, float, float]:
        """Counts a request and draws its fault (None: none); returns it with the latency and the pause."""
        with self._lock:
            self._counts["requests"] += 1
            draw, edge, fault = self._random.random(), 0.0, None
            for name in FAULTS:
                edge += self._rates[name]
                if draw < edge:
                    fault = name
                    self._counts[name] += 1
                    break
            return fault, self._latency_s, self._slow_body_s

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault, latency_s, slow_body_s = self._draw()
        if latency_s:
            await asyncio.sleep(latency_s)
        if fault in _ERRORS:
            return _gcs_error(*_ERRORS[fault])
        if fault == "drop":
            request.transport.abort()
            return web.Response()  # aiohttp finds the connection closed and sends nothing
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        data = request.content if request.body_exists else None
        if request.method == "POST" and request.path == "/batch/storage/v1":
            data = add_batch_content_ids(await request.read(), request.headers.get("Content-Type", ""))
            headers["Content-Length"] = str(len(data))
        try:
            upstream = await self._session.request(
                request.method, URL(self.target + request.raw_path, encoded=True), headers=headers, data=data,
                allow_redirects=False)
        except aiohttp.ClientError as error:
            return _gcs_error(502, "badGateway", f"FaultProxy could not reach {self.target}: {error!r}")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() == "location" and value.startswith(self.target):
                    value = self.url + value[len(self.target):]  # resumable uploads come back to the proxy
                if name.lower() not in _HOP_BY_HOP:
                    response.headers.add(name, value)
            try:
                await response.prepare(request)
                if fault == "slow_body":
                    await response.write(await upstream.content.read(_SLOW_BODY_HEAD))
                    await asyncio.sleep(slow_body_s)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):  # one side went away mid-body: so does the other
                if request.transport is not None:
                    request.transport.abort()
            return response


def _gcs_error(status: int, reason: str, message: str) -> web.Response:
    """An error response shaped like the GCS JSON API's."""
    body = {"error": {"code": status, "message": message,
                      "errors": [{"domain": "global", "reason": reason, "message": message}]}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def add_batch_content_ids(body: bytes, content_type: str) -> bytes:
    """A multipart batch body whose parts without a Content-ID header get one (<1>, <2>, … by position)."""
    parsed = email.message.Message()
    parsed["Content-Type"] = content_type
    boundary = parsed.get_boundary()
    if not boundary:
        return body
    pieces = body.split(b"--" + boundary.encode())
    for index, piece in enumerate(pieces[1:], start=1):
        if piece.startswith(b"--"):  # the closing delimiter
            break
        newline = b"\r\n" if piece.startswith(b"\r\n") else b"\n"  # the Python client ends lines with \n
        if b"\ncontent-id:" not in piece.split(newline + newline, 1)[0].lower():
            pieces[index] = newline + b"Content-ID: <%d>" % index + piece
    return (b"--" + boundary.encode()).join(pieces)
