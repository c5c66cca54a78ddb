"""EngineConfig: what a user sets about the engine, validated once, frozen and picklable."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity; os.cpu_count() where that is unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    Attributes:
        batch_size: records per forward pass.
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        channels_last: convert the model to channels_last memory format (convolutional models on CUDA).
        compile: wrap the model in torch.compile.
        fetch_threads: concurrent blocking reads, for URLs whose fsspec filesystem is not async (memory://, say);
            I/O-bound, so more than the cores.
        fetch_concurrency: remote requests in flight per direction (reads; writes of the put stage) for async
            filesystems (gs://, s3://, http(s)://), all on one event-loop thread. An object store answers in
            20-50 ms: 256 in flight sustain about 5,000-12,000 objects/s.
        fetch_max_bytes: no new remote read starts while this many bytes of read data wait for preprocess.
        io_attempts: tries per remote request; transient failures (408, 429, 5xx, a dropped connection, a
            timeout) are retried, permanent ones (404, 403, 400) are not.
        io_backoff_s: the first retry waits up to this long (uniformly drawn), each next one up to twice as long,
            at most 10 s.
        io_timeout_s: the longest one attempt of a remote request may take.
        decode_threads: decode and preprocess threads. 0 means a thread per core, counted where the engine runs
            (a worker), not where the job was launched. The decode threads spend most of their time in C with
            the GIL released; Beam's thread and the engine's stage threads share the cores with them.
        postprocess_threads: postprocess threads.
        max_batch_wait_s: the longest a partial batch waits for more records.
        max_in_flight: records submitted and not yet returned, across all bundles; `submit` blocks beyond it.
            0 means four batches.
        host_buffers: pinned host buffers per direction (one being filled, one copying, one spare).
        trace_events: keep timed CUDA events per batch and stage (for overlap tests and profiling), the last
            4,096 spans.
        stop_timeout_s: the longest stopping the engine (the last DoFn's teardown, interpreter exit, replacing a
            failed run) waits for its threads; a thread still running then (stuck in a model call, say) is named
            in an error log and left behind.
        gil_switch_interval_s: the GIL switch interval the engine sets for its process (sys.setswitchinterval;
            Python's default is 0.005); 0 leaves the process's as it is. A thread that released the GIL for C
            work (a decode step, a kernel launch) waits up to this long to get it back while a pure-Python
            thread (Beam's) runs; a shorter interval shortens that wait and costs more switches. Process-wide.
        telemetry_dir: a directory where each engine appends a sample of its progress, stage busy time and
            queue fill every `telemetry_interval_s` (beam_infer/engine/telemetry.py), for a launcher's progress
            line and report (beam_infer/monitor.py). Written only where the directory exists: on workers that
            share the launcher's file system (DirectRunner, a LOOPBACK environment), not on remote ones.
        telemetry_interval_s: seconds between two samples.
        max_tokens: for a task with variable-length inputs (InferenceTask.pad_value), the most padded elements in
            a batch: its records times its longest input rounded up to `pad_multiple` (a record longer than that
            goes alone). 0: batches are bounded by batch_size only.
        bucket_batches: for such a task, how many batches' worth of ready records (bucket_batches x batch_size)
            the batch thread holds to group records of similar length; 1 batches in arrival order. The automatic
            max_in_flight grows by the window (to bucket_batches + 8 batches).
        pad_multiple: a batch of variable-length inputs pads to its longest, rounded up to a multiple of this.
    """

    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    channels_last: bool = False
    compile: bool = False
    fetch_threads: int = 16
    fetch_concurrency: int = 256
    fetch_max_bytes: int = 512 << 20
    io_attempts: int = 5
    io_backoff_s: float = 0.1
    io_timeout_s: float = 60.0
    decode_threads: int = 0
    postprocess_threads: int = 2
    max_batch_wait_s: float = 0.05
    max_in_flight: int = 0
    host_buffers: int = 3
    trace_events: bool = False
    stop_timeout_s: float = 30.0
    gil_switch_interval_s: float = 0.001
    telemetry_dir: str | None = None
    telemetry_interval_s: float = 0.5
    max_tokens: int = 0
    bucket_batches: int = 16
    pad_multiple: int = 8

    def __post_init__(self) -> None:
        if self.decode_threads < 0:
            raise ValueError(f"EngineConfig.decode_threads must be 0 (automatic) or more, got {self.decode_threads}")
        for name in ("batch_size", "fetch_threads", "postprocess_threads", "host_buffers", "fetch_concurrency",
                     "fetch_max_bytes", "io_attempts", "bucket_batches", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_in_flight < 0:
            raise ValueError(f"EngineConfig.max_in_flight must be 0 (automatic) or more, got {self.max_in_flight}")
        if 0 < self.max_in_flight < self.batch_size:
            raise ValueError(f"EngineConfig.max_in_flight ({self.max_in_flight}) must be 0 (automatic: four batches) "
                             f"or at least batch_size ({self.batch_size}): with fewer records in flight no batch "
                             f"can fill, and each would wait max_batch_wait_s")
        if self.max_tokens < 0:
            raise ValueError(f"EngineConfig.max_tokens must be 0 (no budget) or more, got {self.max_tokens}")
        if 0 < self.max_tokens < self.pad_multiple:
            raise ValueError(f"EngineConfig.max_tokens ({self.max_tokens}) must be 0 or at least pad_multiple "
                             f"({self.pad_multiple}): every batch pads to at least one multiple")
        if self.stop_timeout_s < 0:
            raise ValueError(f"EngineConfig.stop_timeout_s must not be negative, got {self.stop_timeout_s}")
        if self.gil_switch_interval_s < 0:
            raise ValueError(
                f"EngineConfig.gil_switch_interval_s must not be negative, got {self.gil_switch_interval_s}")
        if self.io_backoff_s < 0 or self.io_timeout_s <= 0:
            raise ValueError(f"EngineConfig.io_backoff_s must not be negative and io_timeout_s must be positive, got "
                             f"{self.io_backoff_s} and {self.io_timeout_s}")
        if self.telemetry_interval_s <= 0:
            raise ValueError(f"EngineConfig.telemetry_interval_s must be positive, got {self.telemetry_interval_s}")
        if self.max_batch_wait_s < 0:
            raise ValueError(f"EngineConfig.max_batch_wait_s must not be negative, got {self.max_batch_wait_s}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"EngineConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def torch_device(self) -> torch.device:
        """The device this config names, with "auto" resolved on the machine that calls it."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} asked for, but CUDA is not available on this machine")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The model's dtype on `device`, with "auto" resolved."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]

    @property
    def decode_pool_size(self) -> int:
        """decode_threads, with 0 resolved on this machine: a thread per core."""
        return self.decode_threads or available_cores()

    @property
    def in_flight_limit(self) -> int:
        """Records in flight for a task of fixed-size inputs: max_in_flight, or four batches."""
        return self.max_in_flight or 4 * self.batch_size

    def in_flight_limit_for(self, variable_length: bool) -> int:
        """Records in flight: max_in_flight, or four batches; for variable-length inputs, the bucketing window
        (bucket_batches batches) plus the eight batches that can be on their way from the batch thread to the
        postprocess (collating, two queued, in the forward, two queued, unloading, postprocessing), so that the
        window can fill while the device is busy."""
        if self.max_in_flight or not variable_length or self.bucket_batches == 1:
            return self.in_flight_limit
        return (8 + self.bucket_batches) * self.batch_size
