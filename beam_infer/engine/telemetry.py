"""The engine's telemetry: every `telemetry_interval_s`, one JSON line of its progress, stage busy time and queue
fill, appended to a file of its own in `EngineConfig.telemetry_dir`, for the launcher's progress line and report
(beam_infer/monitor.py reads them).

A file starts with a header line (what the engine is: process, device, thread counts); each later line is a
sample of running totals (records finished, dead letters, busy seconds per stage, batches) and of the moment
(records in flight, queue lengths, GPU utilisation and memory on CUDA). Totals, not rates: a reader computes
rates over any interval, and a lost line loses nothing. The sampler reads counters the stage threads keep
anyway; the stage threads do no extra work for it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, TextIO

import torch

from beam_infer.engine.health import process_fault

if TYPE_CHECKING:
    from beam_infer.engine.engine import Engine
    from beam_infer.engine.run import Run

_LOG = logging.getLogger(__name__)
FILE_PREFIX = "engine-"
FILE_SUFFIX = ".jsonl"
_numbers = itertools.count()  # engines of this process: an id() could be reused by a later engine
_JOIN_S = 1.0  # the longest a run's stop waits for the sampler's thread


def start_sampler(engine: Engine, directory: str, interval_s: float) -> Sampler | None:
    """A Sampler for `engine`, or None (with a warning) where the file cannot be made: the job runs without."""
    try:
        return Sampler(engine, directory, interval_s)
    except Exception as e:  # noqa: BLE001 - an unwritable folder, one removed meanwhile
        _LOG.warning("beam_infer: no telemetry in %s: %r", directory, e)
        return None


class Sampler:
    """Writes `engine`'s samples to `<directory>/engine-<pid>-<n>.jsonl`: its header at once, then, while the engine
    has a run (`start` / `stop`, from the engine's lifecycle: no thread outlives a pipeline), a sample every
    `interval_s` from a daemon thread, and one more as the run stops, until the directory is removed (the
    launcher's job is over) or `close`."""

    def __init__(self, engine: Engine, directory: str, interval_s: float) -> None:
        self._engine = weakref.ref(engine)  # the sampler does not keep an engine alive
        self._directory = directory
        self._interval_s = interval_s
        self._lock = threading.Lock()  # one writer at a time: the thread, or a run's stop
        self._file: TextIO | None = open(  # noqa: SIM115 - closed by close(), or with the sampler
            os.path.join(directory, f"{FILE_PREFIX}{os.getpid()}-{next(_numbers)}{FILE_SUFFIX}"), "a")
        self._gpu = _GpuGauges(engine.device)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._gpu_ok = True  # False once a stop said the device may be lost
        self._write(header(engine))

    def start(self) -> None:
        """The engine started a run: samples every interval until `stop`."""
        if self._thread is not None or self._file is None:
            return
        stopped = threading.Event()
        thread = threading.Thread(target=self._loop, args=(stopped,), name="beam_infer-telemetry", daemon=True)
        try:
            thread.start()
        except Exception as e:  # noqa: BLE001 - no thread to be had: the run goes on without samples
            _LOG.warning("beam_infer: no telemetry thread: %r", e)
            return
        self._stopped, self._thread = stopped, thread

    def stop(self, final: bool = True, gpu: bool = True, run: Run | None = None) -> None:
        """The engine's run stopped: the thread ends, and, when `final`, a last sample is written (of `run`'s
        queues; the launcher sees the run's last records without waiting). Without `gpu` (a device fault, a stuck
        thread) no GPU gauge is read from now on: NVML may block on a lost device."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        if not gpu:
            self._gpu_ok = False
        if thread is not None and thread.is_alive():
            thread.join(_JOIN_S)  # a sample in progress; NVML on a lost GPU could block longer: a daemon thread
        if final:
            self.sample_now(run)

    def close(self) -> None:
        self.stop(final=False)
        self._close_file()

    def sample_now(self, run: Run | None = None) -> None:
        """Writes a sample at once, unless the launcher's folder is gone (then the file is closed). Never raises:
        telemetry must not disturb the engine."""
        engine = self._engine()
        if engine is None:
            return
        if not os.path.isdir(self._directory):
            self._close_file()
            return
        try:
            gpu = self._gpu if self._gpu_ok and process_fault() is None else None
            self._write(sample(engine, gpu, run))
        except Exception as e:  # noqa: BLE001
            _LOG.warning("beam_infer: telemetry sample failed: %r", e)

    def _close_file(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _loop(self, stopped: threading.Event) -> None:
        while not stopped.wait(self._interval_s) and self._engine() is not None:
            self.sample_now()

    def _write(self, line: dict[str, Any]) -> None:
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
                self._file.flush()
            except (OSError, ValueError) as e:  # a full disk: no telemetry, the job goes on
                _LOG.warning("beam_infer: telemetry stopped: %r", e)
                self._file = None


def header(engine: Engine) -> dict[str, Any]:
    c = engine.config
    return {"header": True, "t": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
            "task": engine.task.name, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "batch_size": c.batch_size, "in_flight_limit": engine.in_flight_limit, "interval_s": c.telemetry_interval_s,
            "threads": {"decode": c.decode_pool_size, "fetch": c.fetch_threads, "remote": c.fetch_concurrency,
                        "postprocess": c.postprocess_threads}}


def sample(engine: Engine, gpu: _GpuGauges | None = None, run: Run | None = None) -> dict[str, Any]:
    """The engine's running totals and the queues of `run` (default: its current run) at this moment."""
    stats = engine.stats
    line: dict[str, Any] = {
        "t": time.time(), "records": engine.finished.value, "dead_letters": engine.failed.value,
        "busy": {stage: round(seconds, 6) for stage, seconds in stats.totals().items()},
        "batch_sizes": dict(stats.batch_size_counts), "runs": engine.runs_started,
    }
    run = run or engine.current_run
    line["queues"] = run.occupancy() if run is not None else {}
    if gpu is not None:
        line.update(gpu.read())
    return line


class _GpuGauges:
    """The device's utilisation (NVML, through torch.cuda.utilization) and memory, on CUDA; nothing elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self._device = device if device.type == "cuda" else None
        self._utilization = self._device is not None

    def read(self) -> dict[str, Any]:
        if self._device is None:
            return {}
        out: dict[str, Any] = {}
        if self._utilization:
            try:
                out["gpu_util"] = torch.cuda.utilization(self._device)
            except Exception as e:  # noqa: BLE001 - no NVML (nvidia-ml-py) here: memory only
                _LOG.info("beam_infer: no GPU utilisation in telemetry: %r", e)
                self._utilization = False
        try:
            free, total = torch.cuda.mem_get_info(self._device)
            out["gpu_mem"] = total - free
            out["gpu_mem_total"] = total
            out["gpu_allocated"] = torch.cuda.memory_allocated(self._device)
        except Exception:  # noqa: BLE001 - a device in trouble: the engine reports that itself
            self._device = None
        return out
