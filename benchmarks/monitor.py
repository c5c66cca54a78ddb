"""Samples what a competitor costs while it runs: GPU utilisation (NVML), peak host RSS, peak GPU memory."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

_SAMPLE_S = 0.05  # NVML's utilisation counter covers the last 1/6 s to 1 s; 50 ms sampling follows it closely
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _nvml_handle(device: torch.device):
    """An NVML handle for `device`, or None without CUDA or without nvidia-ml-py."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return pynvml.nvmlDeviceGetHandleByIndex(index)


@dataclass
class Usage:
    gpu_util_pct: float | None
    peak_rss_mb: float
    peak_gpu_mem_mb: float | None


class Monitor:
    """`with Monitor(device) as m: ...` then `m.usage`: mean GPU utilisation over the block, peaks of memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._handle = _nvml_handle(device)
        self._stop = threading.Event()
        self._utils: list[int] = []
        self._peak_rss = 0
        self.usage: Usage | None = None

    def _sample(self) -> None:
        while True:
            self._peak_rss = max(self._peak_rss, rss_bytes())
            if self._handle is not None:
                import pynvml
                self._utils.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            if self._stop.wait(_SAMPLE_S):
                return

    def __enter__(self) -> Monitor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak_rss = max(self._peak_rss, rss_bytes())
        gpu_mem = None
        if self.device.type == "cuda":
            gpu_mem = torch.cuda.max_memory_allocated(self.device) / 2**20
        util = sum(self._utils) / len(self._utils) if self._utils else None
        self.usage = Usage(util, self._peak_rss / 2**20, gpu_mem)


def describe_device(device: torch.device) -> str:
    """The device in words, for the results: GPU name, or CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores (CPU only)"
