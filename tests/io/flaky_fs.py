"""A scripted async fsspec filesystem, "flaky://": objects in a dict, and per path a list of what each request
does first (raise an error, or sleep), so tests can drive RemoteIO's retries, bounds and timeouts exactly."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import fsspec
from fsspec.asyn import AsyncFileSystem

PROTOCOL = "flaky"


class Block:
    """A step that blocks the event loop's thread for `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Script:
    """The shared state of every FlakyFileSystem instance (RemoteIO makes its own on its loop)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.steps: dict[str, list] = defaultdict(list)  # path -> [Exception | seconds to sleep | Block | None]
        self.calls: dict[str, int] = defaultdict(int)
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate: threading.Event | None = None  # when set up, requests wait for it
        self.lock = threading.Lock()

    async def request(self, path: str) -> None:
        with self.lock:
            self.calls[path] += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            step = self.steps[path].pop(0) if self.steps[path] else None
        try:
            while self.gate is not None and not self.gate.is_set():
                await asyncio.sleep(0.005)
            if isinstance(step, Block):
                time.sleep(step.seconds)  # holds the event loop, as a synchronous call inside a client would
            elif isinstance(step, (int, float)):
                await asyncio.sleep(step)
            elif step is not None:
                raise step
        finally:
            with self.lock:
                self.in_flight -= 1


SCRIPT = Script()


class FlakyFileSystem(AsyncFileSystem):
    protocol = PROTOCOL
    cachable = False

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        await SCRIPT.request(path)
        if path not in SCRIPT.objects:
            raise FileNotFoundError(path)
        return SCRIPT.objects[path]

    async def _pipe_file(self, path, data, **kwargs):
        await SCRIPT.request(path)
        SCRIPT.objects[path] = bytes(data)


def reset() -> Script:
    """Registers flaky:// (again) and starts a fresh script."""
    global SCRIPT
    fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)
    SCRIPT = Script()
    return SCRIPT


class HttpError(Exception):
    """Shaped like gcsfs's HttpError: the status in `.code`."""

    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP error {code}")
        self.code = code
