"""The engine's three CUDA streams (H2D copy, compute, D2H copy) and the events that order them.

On the CPU every stream is None and every call here is a no-op, so the engine's code has one path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Streams:
    """H2D, compute and D2H streams of one device; `timing` makes events that can measure elapsed time."""

    def __init__(self, device: torch.device, *, timing: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.timing = timing
        make = (lambda: torch.cuda.Stream(device)) if self.cuda else (lambda: None)
        self.h2d, self.compute, self.d2h = make(), make(), make()

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Makes `stream` current for the work launched inside."""
        if stream is None:
            yield
        else:
            with torch.cuda.stream(stream):
                yield

    def record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """Records an event on `stream`: it completes when the work launched so far on it has."""
        if stream is None:
            return None
        event = torch.cuda.Event(enable_timing=self.timing, blocking=True)  # a host wait sleeps, not spins
        event.record(stream)
        return event

    @staticmethod
    def wait(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        """Makes `stream` wait, on the device, for `event`."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    @staticmethod
    def keep_for(tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Tells the caching allocator that `stream` uses `tensor`, so its memory is not reused too early."""
        if stream is not None and tensor.is_cuda:
            tensor.record_stream(stream)

    @staticmethod
    def drain(stream: torch.cuda.Stream | None) -> None:
        """Blocks the host until the work launched so far on `stream` has completed."""
        if stream is not None:
            stream.synchronize()

    @staticmethod
    def synchronize(event: torch.cuda.Event | None) -> None:
        """Blocks the host until `event` has completed (a non-blocking D2H copy is readable only after)."""
        if event is not None:
            event.synchronize()
