"""What the engines of a job are doing, read from their telemetry (beam_infer/engine/telemetry.py): records done
and per second, dead letters, how busy each stage was, how full the engine was, and which stage held the job
back. The launcher's progress line (pipelines/progress.py) and report (beam_infer/report.py) are built on it.

Each engine's file holds running totals at sampled moments; between two samples a total is taken to grow
linearly, so any interval's rate or busy fraction is the growth of the totals over it, summed over the engines
and divided by the capacity of those alive during it (a stage's threads times the seconds).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from beam_infer.engine.telemetry import FILE_PREFIX, FILE_SUFFIX

# The stages a person reads about, each with the engine stages it sums. The capacity is the threads that run
# them (see _capacity): a fraction of 1.0 means every one of those threads was busy all the time.
STAGES = {
    "fetch": ("fetch",),
    "decode": ("preprocess",),
    "h2d": ("collate", "h2d", "device_preprocess"),
    "forward": ("forward",),
    "d2h": ("d2h",),
    "postprocess": ("postprocess",),
    "put": ("put",),
}
# What can hold the job back: the engine's thread pools and threads, with the stages that share them. Local reads
# run in the decode pool and local writes in the postprocess pool; remote ones are requests on remote I/O's loop.
POOLS = {"fetch": ("fetch",), "decode": ("decode",), "h2d": ("h2d",), "forward": ("forward",), "d2h": ("d2h",),
         "postprocess": ("postprocess",), "put": ("put",)}
LOCAL_POOLS = {"decode": ("fetch", "decode"), "postprocess": ("postprocess", "put")}
# On CUDA the forward's host time is its kernel launches; the unload thread's wait for the D2H copy's event is the
# wait for the batch's device work (the copy is queued after the forward), so the two make up the device's time.
CUDA_POOLS = {"forward": ("forward", "d2h")}
INPUT = "input"  # the bottleneck when the engine is not kept full: the read and Beam in front of it
_FULL = 0.5  # an engine holding less than this fraction of its in-flight limit is waiting for input
_SATURATED = 0.85  # a stage this busy is the bottleneck, whatever else is
DEVICE_STAGE = "forward"


class EngineLog:
    """One engine's telemetry: its header and its samples, in time order (each file is written in order)."""

    def __init__(self, header: dict[str, Any], samples: Iterable[dict[str, Any]] = ()) -> None:
        self.header = header
        self.samples = [{"t": header["t"], "records": 0, "dead_letters": 0, "busy": {}, "queues": {}}]
        self.times = [header["t"]]
        self._remote = False
        self.extend(samples)

    def extend(self, samples: Iterable[dict[str, Any]]) -> None:
        for sample in samples:
            if sample["t"] >= self.times[-1]:
                self.samples.append(sample)
                self.times.append(sample["t"])
                self._remote = self._remote or bool((sample.get("queues") or {}).get("remote"))

    @property
    def remote(self) -> bool:
        """Whether the engine read or wrote remote URLs (through remote I/O's requests, not its thread pools), in
        any sample so far."""
        return self._remote

    @property
    def cuda(self) -> bool:
        return str(self.header.get("device", "")).startswith("cuda")

    @property
    def start(self) -> float:
        return self.times[0]

    @property
    def end(self) -> float:
        return self.times[-1]

    def total(self, t: float, name: str, stage: str | None = None) -> float:
        """A running total (`records`, `dead_letters`, or `busy` of `stage`) at `t`, linear between samples."""
        i = bisect.bisect_right(self.times, t)
        if i == 0:
            return 0.0
        value = _get(self.samples[i - 1], name, stage)
        if i == len(self.samples):
            return value
        t0, t1 = self.times[i - 1], self.times[i]  # t0 <= t < t1
        return value + (_get(self.samples[i], name, stage) - value) * (t - t0) / (t1 - t0)

    def gauges(self, t0: float, t1: float) -> list[dict[str, Any]]:
        """The samples taken in [t0, t1), or the nearest one before t0 while the engine lives."""
        lo, hi = bisect.bisect_left(self.times, t0), bisect.bisect_left(self.times, t1)
        if lo < hi:
            return self.samples[max(lo, 1):hi]
        return [self.samples[lo - 1]] if 1 < lo < len(self.samples) else []

    def capacity(self, stage: str) -> int:
        """Threads that run `stage` (see STAGES): local reads run in the decode pool, remote reads and writes as
        requests in flight on remote I/O's loop, local writes in the postprocess pool."""
        threads = self.header["threads"]
        remote = self.remote
        return {"fetch": threads["remote"] if remote else threads["decode"], "decode": threads["decode"],
                "postprocess": threads["postprocess"],
                "put": threads["remote"] if remote else threads["postprocess"]}.get(stage, 1)


def _get(sample: dict[str, Any], name: str, stage: str | None) -> float:
    if stage is None:
        return sample.get(name, 0)
    busy = sample.get("busy", {})
    return sum(busy.get(s, 0.0) for s in STAGES[stage])


class TelemetryReader:
    """Reads the engines' files in a telemetry folder as they grow: each `read` parses only the lines added since
    the last one (a line still being written waits for the next read)."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._files: dict[str, tuple[int, EngineLog | None]] = {}  # name -> (bytes read, its log once it has a header)

    def read(self) -> list[EngineLog]:
        try:
            names = sorted(n for n in os.listdir(self._dir) if n.startswith(FILE_PREFIX) and n.endswith(FILE_SUFFIX))
        except FileNotFoundError:
            names = []
        for name in names:
            offset, log = self._files.get(name, (0, None))
            with open(os.path.join(self._dir, name), "rb") as f:
                f.seek(offset)
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]
            samples = []
            for line in complete.splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if item.get("header"):
                    log = log or EngineLog(item)
                else:
                    samples.append(item)
            if log is not None:
                log.extend(samples)
            self._files[name] = (offset + len(complete), log)
        return [log for _, log in self._files.values() if log is not None]


def read_logs(directory: str) -> list[EngineLog]:
    """The engines' telemetry in `directory`, as it stands."""
    return TelemetryReader(directory).read()


@dataclass
class Window:
    """The job over [t0, t1): what its engines did, summed."""

    t0: float
    t1: float
    records: float  # finished (predictions and dead letters) during the window
    dead_letters: float
    busy: dict[str, float]  # per stage of STAGES: the fraction of its threads' time spent in it
    fill: float | None  # mean records in flight over the in-flight limit; None without a sample
    queues: dict[str, float]  # mean, summed over engines
    gpu_util: float | None  # percent: each engine's mean over the window, the most of any engine
    gpu_mem: float | None  # bytes in use on the device, the most of any sample
    remote: bool = False  # an engine read or wrote remote URLs
    cuda: bool = False  # an engine ran on CUDA

    @property
    def rate(self) -> float:
        return self.records / (self.t1 - self.t0) if self.t1 > self.t0 else 0.0

    def load(self) -> dict[str, float]:
        """How busy each pool was (POOLS; fetch and put in the decode and postprocess pools when local; on CUDA, the
        device's time as NVML measured it where it is known, else the forward's and the D2H wait's)."""
        pools = dict(POOLS)
        if not self.remote:
            pools = {name: stages for name, stages in {**pools, **LOCAL_POOLS}.items() if name not in ("fetch", "put")}
        if self.cuda:
            pools = {**{name: stages for name, stages in pools.items() if name != "d2h"}, **CUDA_POOLS}
        load = {pool: min(1.0, sum(self.busy.get(s, 0.0) for s in stages)) for pool, stages in pools.items()}
        if self.gpu_util is not None:
            load[DEVICE_STAGE] = self.gpu_util / 100
        return load

    def bottleneck(self) -> str | None:
        """The stage that held the job back: the busiest pool when one is saturated or the engine is full,
        else INPUT (the engine waited for records); None with nothing to go on."""
        if (self.fill is None and not self.busy) or self.t1 <= self.t0:
            return None
        pool, busiest = max(self.load().items(), key=lambda kv: kv[1])
        if busiest >= _SATURATED or (self.fill is not None and self.fill >= _FULL):
            return pool
        return INPUT


def window(logs: Sequence[EngineLog], t0: float, t1: float) -> Window:
    records = dead = 0.0
    busy_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    capacity_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    fills: list[float] = []
    queues: dict[str, list[float]] = {}
    utils: list[float] = []  # one mean per engine
    mems: list[float] = []
    for log in logs:
        records += log.total(t1, "records") - log.total(t0, "records")
        dead += log.total(t1, "dead_letters") - log.total(t0, "dead_letters")
        alive = max(0.0, min(t1, log.end) - max(t0, log.start))
        for stage in STAGES:
            busy_s[stage] += log.total(t1, "busy", stage) - log.total(t0, "busy", stage)
            capacity_s[stage] += alive * log.capacity(stage)
        limit = log.header["in_flight_limit"]
        per_engine: dict[str, list[float]] = {}
        engine_utils = []
        for sample in log.gauges(t0, t1):
            q = sample.get("queues") or {}
            if q:
                fills.append(q.get("in_flight", 0) / limit)
            for name, value in q.items():
                if name != "remote":
                    per_engine.setdefault(name, []).append(value)
            if sample.get("gpu_util") is not None:
                engine_utils.append(sample["gpu_util"])
            if sample.get("gpu_mem") is not None:
                mems.append(sample["gpu_mem"])
        for name, values in per_engine.items():
            queues.setdefault(name, []).append(sum(values) / len(values))
        if engine_utils:
            utils.append(sum(engine_utils) / len(engine_utils))
    busy = {s: min(1.0, busy_s[s] / capacity_s[s]) for s in STAGES if capacity_s[s] > 0}
    return Window(t0, t1, records, dead, busy, sum(fills) / len(fills) if fills else None,
                  {name: sum(v) for name, v in queues.items()}, max(utils) if utils else None,
                  max(mems) if mems else None, remote=any(log.remote for log in logs),
                  cuda=any(log.cuda for log in logs))


def timeline(logs: Sequence[EngineLog], start: float, end: float, points: int = 600) -> list[Window]:
    """The job from `start` to `end` in windows of the telemetry's interval, or wider so there are at most
    `points`."""
    if not logs or end <= start:
        return []
    interval = min(log.header.get("interval_s", 1.0) for log in logs)
    step = max(interval, (end - start) / points)
    n = max(1, round((end - start) / step))
    step = (end - start) / n
    return [window(logs, start + i * step, start + (i + 1) * step) for i in range(n)]


def totals(logs: Iterable[EngineLog]) -> dict[str, int]:
    """Records finished and dead letters, as of each engine's last sample."""
    logs = list(logs)
    return {"records": sum(int(log.samples[-1].get("records", 0)) for log in logs),
            "dead_letters": sum(int(log.samples[-1].get("dead_letters", 0)) for log in logs)}


def batch_sizes(logs: Iterable[EngineLog]) -> dict[int, int]:
    """Batches run per size, over every engine."""
    counts: dict[int, int] = {}
    for log in logs:
        for size, n in log.samples[-1].get("batch_sizes", {}).items():
            counts[int(size)] = counts.get(int(size), 0) + n
    return dict(sorted(counts.items()))


def verdict(whole: Window, device: str) -> str:
    """One paragraph on what held the job back, from the job's whole window."""
    if not whole.busy:
        return "No engine telemetry was recorded, so there is nothing to say about where the time went."
    load = whole.load()
    busy = load[DEVICE_STAGE]
    what = "GPU" if device.startswith("cuda") else "model (forward on the CPU)"
    measured = ("by NVML" if whole.gpu_util is not None else
                "as the forward's and the D2H wait's host time" if whole.cuda else "as host time in the forward stage")
    bottleneck = whole.bottleneck()
    head = f"The {what} was busy {busy:.0%} of the time ({measured})"
    if bottleneck == DEVICE_STAGE:
        return f"{head}: the model itself was the bottleneck; a faster model, dtype or device would speed the job."
    if bottleneck == INPUT:
        fill = f"{whole.fill:.0%}" if whole.fill is not None else "little"
        return (f"{head} and idle {1 - busy:.0%} waiting for input: the engine held on average {fill} of the "
                "records it may have in flight, so the read and Beam's work in front of it did not feed it "
                "fast enough (raise --chunk-size, or add workers).")
    return (f"{head} and idle {1 - busy:.0%} of the time waiting on {bottleneck}, whose threads were busy "
            f"{load[bottleneck]:.0%} of the time: {_ADVICE.get(bottleneck, '')}").rstrip(": ")


_ADVICE = {
    "fetch": "more requests in flight (fetch_concurrency) or storage closer to the workers would help.",
    "decode": "more cores per worker, smaller images, or --decode device (nvJPEG) would help.",
    "h2d": "collating and copying batches held it up; pinned buffers (on CUDA) and uint8 inputs help.",
    "d2h": "copying outputs back held it up; smaller outputs would help.",
    "postprocess": "the postprocess (and writing outputs) held it up; more postprocess_threads would help.",
    "put": "writing outputs to the bucket held it up; more requests in flight (fetch_concurrency) would help.",
}
