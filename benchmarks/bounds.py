"""Upper bounds measured in the same run as the competitors: what one stage alone can do on this machine.

    forward_only   the model on a batch already on the device, back to back (no copies, no decode)
    cpu_decode     task.preprocess (decode + resize) over in-memory bytes on a thread pool, a thread per
                   core
    device_decode  task.device_preprocess (nvJPEG decode + resize on the GPU) over in-memory bytes, batched
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from beam_infer.task import InferenceTask, Record

_WARMUP_BATCHES = 2  # cuDNN picks its algorithms and the allocator fills its cache on the first calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_batch(task: InferenceTask, payloads: list[bytes], records: list[Record],
                 device: torch.device) -> torch.Tensor:
    """One batch of model input on the device, made the way the engine makes it."""
    arrays = [task.preprocess(data, r) for data, r in zip(payloads, records, strict=True)]
    if task.device_preprocess is not None:
        return task.device_preprocess([torch.from_numpy(a) for a in arrays], device)
    return torch.from_numpy(np.stack(arrays)).to(device)


def forward_only(model: Callable, batch: torch.Tensor, batches: int) -> float:
    """Records/s of the model alone on `batch`, `batches` times after a warm-up."""
    with torch.inference_mode():
        for _ in range(_WARMUP_BATCHES):
            model(batch)
        _sync(batch.device)
        start = time.perf_counter()
        for _ in range(batches):
            model(batch)
        _sync(batch.device)
    return batches * len(batch) / (time.perf_counter() - start)


def cpu_decode(task: InferenceTask, payloads: list[bytes], records: list[Record], threads: int) -> float:
    """Records/s of task.preprocess over every payload on `threads` threads."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(task.preprocess, payloads[:threads], records[:threads]))  # warm the threads up
        start = time.perf_counter()
        list(pool.map(task.preprocess, payloads, records))
    return len(payloads) / (time.perf_counter() - start)


def device_decode(task: InferenceTask, payloads: list[bytes], records: list[Record], device: torch.device,
                  batch_size: int) -> float:
    """Records/s of task.device_preprocess over every payload, in batches, with the host side done before."""
    encoded = [torch.from_numpy(task.preprocess(d, r)) for d, r in zip(payloads, records, strict=True)]
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    for batch in batches[:_WARMUP_BATCHES]:
        task.device_preprocess(batch, device)
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        task.device_preprocess(batch, device)
    _sync(device)
    return len(encoded) / (time.perf_counter() - start)
