"""Samples what a competitor costs while it runs: GPU utilisation (NVML through torch), host RSS, GPU memory."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

_SAMPLE_S = 0.05  # NVML's utilisation counter covers the last 1/6 s to 1 s; 50 ms sampling follows it closely
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _gpu_util(device: torch.device):
    """A function returning the device's utilisation in %, or None without CUDA or without nvidia-ml-py."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.utilization(device)  # nvidia-ml-py, with CUDA_VISIBLE_DEVICES mapped to NVML's indices
    except Exception:  # noqa: BLE001 - no NVML (or MIG, where it reports no utilisation): none measured
        return None
    return lambda: torch.cuda.utilization(device)


@dataclass
class Usage:
    gpu_util_pct: float | None
    peak_rss_mb: float
    rss_growth_mb: float
    peak_gpu_mem_mb: float | None


class Monitor:
    """`with Monitor(device) as m: ...` then `m.usage_between(t0, t1)`: mean GPU utilisation over [t0, t1]
    (time.perf_counter), peak and growth of host RSS over the block, peak GPU memory allocated during it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._util = _gpu_util(device)
        self._stop = threading.Event()
        self._samples: list[tuple[float, float]] = []  # (perf_counter, utilisation %)
        self._peak_rss = 0

    def _sample(self) -> None:
        while True:
            self._peak_rss = max(self._peak_rss, rss_bytes())
            if self._util is not None:
                try:
                    self._samples.append((time.perf_counter(), self._util()))
                except Exception:  # noqa: BLE001 - stop sampling the GPU, keep sampling memory
                    self._util = None
            if self._stop.wait(_SAMPLE_S):
                return

    def __enter__(self) -> Monitor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu_base = torch.cuda.memory_allocated(self.device)
        self._rss_base = rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak_rss = max(self._peak_rss, rss_bytes())
        self._gpu_peak = None
        if self.device.type == "cuda":
            self._gpu_peak = (torch.cuda.max_memory_allocated(self.device) - self._gpu_base) / 2**20

    def usage_between(self, start: float, end: float) -> Usage:
        utils = [u for t, u in self._samples if start <= t <= end]
        return Usage(sum(utils) / len(utils) if utils else None, self._peak_rss / 2**20,
                     (self._peak_rss - self._rss_base) / 2**20, self._gpu_peak)


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
