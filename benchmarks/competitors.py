"""What a user would run instead of beam_infer, and beam_infer itself, on the same task, data and batch size.

    naive        fetch → decode → to(device) → forward → cpu() → postprocess, one batch after another
    runinference Beam's RunInference with PytorchModelHandlerTensor on the same runner (decode in a Map on CPU)
    spdl         the seed's own pipeline without Beam: SPDL's PipelineBuilder (benchmarks/spdl_competitor.py)
    beam_infer   `pipelines.run.run_job`, the code path of `python -m pipelines.run`

Each returns a Run: records done, wall seconds (end to end, with Beam's start-up and the writes for the Beam
competitors) and steady seconds (from the first record's decode to the last record's postprocess).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from torch import nn

from beam_infer import EngineConfig, ReadRecords, WritePredictions
from beam_infer.engine import as_numpy, load_on_device
from beam_infer.io.fetch import fetch_bytes, open_uri
from beam_infer.io.put import is_local_uri, write_local_atomically
from beam_infer.runners import InProcessDirectRunner
from beam_infer.task import Blob, InferenceTask, Record, record_id

_NAMESPACE = "benchmarks"


@dataclass
class Run:
    records: int
    seconds: float
    steady_start: float  # perf_counter when the first record started, and when the last one ended
    steady_end: float
    busy_s: dict[str, float] = field(default_factory=dict)
    batches: int | None = None  # forward passes, where the competitor reports them
    mean_batch_size: float | None = None
    stages: dict[str, dict[str, float]] | None = None  # per-stage statistics of its own (spdl)
    counters: dict[str, int] = field(default_factory=dict)  # beam_infer's job counters

    @property
    def steady_seconds(self) -> float:
        return self.steady_end - self.steady_start


class Clock:
    """When the first record started and the last one ended, across threads (in this process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: float | None = None
        self.last: float | None = None

    def start(self) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.first is None:
                self.first = now

    def end(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self.last = now if self.last is None else max(self.last, now)



_CLOCKS: dict[str, Clock] = {}  # by run id: Beam pickles the DoFns, so they find their clock by name


class _Timed:
    """Wraps a preprocess (`edge="start"`) or postprocess (`edge="end"`) so the clock sees it; picklable."""

    def __init__(self, fn: Callable, clock_id: str, edge: str) -> None:
        self.fn, self.clock_id, self.edge = fn, clock_id, edge

    def __call__(self, *args):
        clock = _CLOCKS[self.clock_id]
        if self.edge == "start":
            clock.start()
            return self.fn(*args)
        out = self.fn(*args)
        clock.end()
        return out


class _PutBlobs:
    """Wraps a postprocess so the Blobs it returns are written, one after the other, and their fields become
    their URIs: what beam_infer's put stage does, done the simple way; picklable."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args) -> dict:
        return put_blobs(self.fn(*args))


def put_blobs(value: dict) -> dict:
    """Writes the Blobs among `value`'s fields, one after the other, each replaced by its URI (a shared helper of the
    competitors that are not beam_infer)."""
    for key, blob in value.items():
        if isinstance(blob, Blob):
            if is_local_uri(blob.uri):
                write_local_atomically(blob.uri, blob.data)
            else:
                with open_uri(blob.uri, "wb") as f:
                    f.write(blob.data)
            value[key] = blob.uri
    return value


def _new_clock() -> tuple[str, Clock]:
    clock_id = f"clock-{len(_CLOCKS)}-{os.getpid()}"
    _CLOCKS[clock_id] = Clock()
    return clock_id, _CLOCKS[clock_id]


# ---- naive --------------------------------------------------------------------------------------------


def naive(task: InferenceTask, config: EngineConfig, records: list[Record]) -> Run:
    """One batch at a time, each step waiting for the previous one: what a first script does."""
    model, device, _ = load_on_device(task, config)
    cuda = device.type == "cuda"
    busy: Counter[str] = Counter()
    done = 0
    start = time.perf_counter()

    def step(stage: str, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if cuda and stage in ("h2d", "device_preprocess", "forward"):
            torch.cuda.synchronize(device)  # so each stage's time is its own; the loop is sequential anyway
        busy[stage] += time.perf_counter() - t0
        return out

    with torch.inference_mode():
        for lo in range(0, len(records), config.batch_size):
            batch = records[lo:lo + config.batch_size]
            payloads = step("fetch", _fetch_all, batch)
            arrays = step("preprocess", _preprocess_all, task, payloads, batch)
            if task.device_preprocess is not None:
                x = step("device_preprocess", task.device_preprocess, [torch.from_numpy(a) for a in arrays], device)
            else:
                x = step("h2d", _to_device, arrays, device)
            outs = step("forward", model, x)
            outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
            host = step("d2h", _to_host, outs)
            values = step("postprocess", _postprocess_all, task, host, batch)
            step("put", lambda vs: [put_blobs(v) for v in vs], values)
            done += len(batch)
    end = time.perf_counter()
    return Run(done, end - start, start, end, dict(busy))


def _fetch_all(records: list[Record]) -> list[bytes]:
    return [fetch_bytes(r["uri"]) for r in records]


def _preprocess_all(task: InferenceTask, payloads: list[bytes], records: list[Record]) -> list[np.ndarray]:
    return [task.preprocess(data, r) for data, r in zip(payloads, records, strict=True)]


def _to_device(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).to(device)


def _to_host(outputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [as_numpy(out.cpu()) for out in outputs]


def _postprocess_all(task: InferenceTask, host: list[np.ndarray], records: list[Record]) -> list[dict]:
    return [task.postprocess(tuple(h[i] for h in host), r) for i, r in enumerate(records)]


# ---- Beam RunInference --------------------------------------------------------------------------------


class HandlerModel(nn.Module):
    """The task's model as PytorchModelHandlerTensor builds it: same dtype and memory format as beam_infer's,
    returning a dict of CPU tensors (RunInference splits a dict per record; one D2H copy per batch)."""

    def __init__(self, load_model: Callable[[], nn.Module], dtype: str, channels_last: bool) -> None:
        super().__init__()
        self.model = load_model().to(getattr(torch, dtype))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = self.model(x)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        return {f"out{i}": out.cpu() for i, out in enumerate(outs)}


class _Load(beam.DoFn):
    def __init__(self, preprocess: Callable) -> None:
        self._preprocess = preprocess

    def process(self, record: Record):
        array = self._preprocess(fetch_bytes(record["uri"]), record)
        yield record, torch.from_numpy(np.require(array, requirements="W"))  # PIL's arrays are read-only


class _Postprocess(beam.DoFn):
    def __init__(self, task_name: str, postprocess: Callable) -> None:
        self._name = task_name
        self._postprocess = postprocess

    def process(self, keyed):
        record, result = keyed
        outputs = tuple(as_numpy(result.inference[f"out{i}"]) for i in range(len(result.inference)))
        Metrics.counter(_NAMESPACE, "records").inc()
        yield {**record, "id": record_id(record), "model": self._name, **self._postprocess(outputs, record)}


def runinference(task: InferenceTask, config: EngineConfig, manifest: str, output: str) -> Run:
    """Beam RunInference on the in-process DirectRunner; `task` must decode on the CPU (no device_preprocess)."""
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    device = config.torch_device()
    dtype = str(config.torch_dtype(device)).removeprefix("torch.")
    channels_last = config.channels_last
    params = {"load_model": task.load_model, "dtype": dtype, "channels_last": channels_last}
    weights = os.path.join(tempfile.mkdtemp(prefix="bench_ri_"), "state_dict.pt")
    torch.save(HandlerModel(**params).state_dict(), weights)
    handler = KeyedModelHandler(PytorchModelHandlerTensor(
        state_dict_path=weights, model_class=HandlerModel, model_params=params,
        device="GPU" if device.type == "cuda" else "CPU",
        min_batch_size=config.batch_size, max_batch_size=config.batch_size))
    clock_id, clock = _new_clock()
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner=InProcessDirectRunner(), options=PipelineOptions([]))
    (pipeline
     | "Read" >> ReadRecords(manifest) | "Spread" >> beam.Reshuffle()
     | "Load" >> beam.ParDo(_Load(_Timed(task.preprocess, clock_id, "start")))
     | "RunInference" >> RunInference(handler)
     | "Postprocess" >> beam.ParDo(_Postprocess(task.name, _PutBlobs(_Timed(task.postprocess, clock_id, "end"))))
     | "Write" >> WritePredictions(output, task.output_schema))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    counters = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))["counters"]
    records = sum(c.committed or c.attempted or 0 for c in counters if c.key.metric.name == "records")
    return Run(records, seconds, clock.first or 0.0, clock.last or 0.0)


# ---- beam_infer ---------------------------------------------------------------------------------------


def beam_infer(task: InferenceTask, config: EngineConfig, manifest: str, output: str,
               rows: str = "predictions") -> Run:
    """`pipelines.run.run_job` on the in-process DirectRunner, with the task's edges timed."""
    from pipelines.run import run_job

    clock_id, clock = _new_clock()
    timed = dataclasses.replace(task, preprocess=_Timed(task.preprocess, clock_id, "start"),
                                postprocess=_Timed(task.postprocess, clock_id, "end"))
    summary = run_job(PipelineOptions([]), manifest, timed, config, output, rows=rows)
    busy = {name.removeprefix("busy_us_"): us / 1e6 for name, us in summary.counters.items()
            if name.startswith("busy_us_")}
    return Run(summary.get("predictions"), summary.seconds, clock.first or 0.0, clock.last or 0.0, busy,
               summary.get("batches"), round(summary.mean_batch_size, 1), counters=summary.counters)
