"""Competitor `spdl`: the seed's own pipeline, SPDL's `spdl.pipeline.PipelineBuilder` run as a plain script without
Beam, on the same task, data, batch size and thread counts as beam_infer. SPDL (`spdl==0.8.0`) is a benchmark
dependency (the `bench` extra), imported when the competitor runs."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import torch

from beam_infer import EngineConfig
from beam_infer.engine import as_numpy, load_on_device
from beam_infer.io.fetch import fetch_bytes
from beam_infer.io.gcs_env import prepare_gcsfs, storage_options
from beam_infer.io.put import is_local_uri
from beam_infer.task import InferenceTask, Record
from benchmarks.competitors import Clock, Run, put_blobs


def spdl(task: InferenceTask, config: EngineConfig, records: list[Record]) -> Run:
    """SPDL's pipeline (`spdl.pipeline.PipelineBuilder`, a benchmark dependency), as its "Building an inference
    pipeline" guide builds one: records → fetch and preprocess (a thread pool of beam_infer's decode size; local
    files are read there, as beam_infer's engine reads them in its decode pool; remote objects are fetched before,
    by coroutines of fsspec's async filesystem on SPDL's event loop, `fetch_concurrency` at a time, with gcsfs's own
    retries, as an SPDL user would) → aggregate(batch_size) → collate
    → H2D (`spdl.io.transfer_tensor_h2d`: pinned, on a side stream; or the task's device_preprocess on one) →
    forward → D2H (`spdl.io.transfer_tensor_d2h`, on a side stream after the forward's event) → postprocess (a pool
    of beam_infer's postprocess size; Blobs written as the other competitors do) → sink. One thread per stage
    between, as SPDL's guide advises for the GPU stages. Its per-stage task stats and queue occupancy go into
    `Run.stages`."""
    from spdl.pipeline import PipelineBuilder

    model, device, _ = load_on_device(task, config)
    cuda = device.type == "cuda"
    spdl_io = importlib.import_module("spdl.io") if cuda else None  # its transfers need CUDA
    clock = Clock()
    stages: dict[str, dict[str, float]] = {}

    def load(record: Record) -> tuple[Record, np.ndarray]:
        clock.start()
        return record, task.preprocess(fetch_bytes(record["uri"]), record)

    remote = bool(records) and not is_local_uri(records[0]["uri"])
    prepare_gcsfs()  # under STORAGE_EMULATOR_HOST: no wait on Google's storage-control API
    filesystems: dict[str, Any] = {}

    async def fetch(record: Record) -> tuple[Record, bytes]:
        protocol, path = record["uri"].split("://", 1)
        if protocol not in filesystems:  # made on SPDL's event loop, the one that will use it
            filesystems[protocol] = fsspec.filesystem(protocol, asynchronous=True, skip_instance_cache=True,
                                                      **storage_options(record["uri"]))
            if hasattr(filesystems[protocol], "set_session"):
                await filesystems[protocol].set_session()
        return record, await filesystems[protocol]._cat_file(path)

    def preprocess(item: tuple[Record, bytes]) -> tuple[Record, np.ndarray]:
        clock.start()
        record, data = item
        return record, task.preprocess(data, record)

    def collate(items: list[tuple[Record, np.ndarray]]):
        batch_records = [r for r, _ in items]
        if task.device_preprocess is not None:
            return batch_records, [torch.from_numpy(np.require(a, requirements="W")) for _, a in items]
        return batch_records, torch.from_numpy(np.stack([a for _, a in items]))

    def h2d(item):
        batch_records, host = item
        if task.device_preprocess is not None:
            if not cuda:  # the CPU stand-in for nvJPEG (the smoke runs)
                return batch_records, task.device_preprocess(host, device)
            return batch_records, _on_side_stream(lambda: task.device_preprocess(host, device), device)
        return batch_records, spdl_io.transfer_tensor_h2d(host) if cuda else host

    def forward(item):
        batch_records, x = item
        with torch.inference_mode():
            outs = model(x)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return batch_records, outs, event

    def d2h(item):
        batch_records, outs, event = item
        if cuda:
            outs = spdl_io.transfer_tensor_d2h(outs, device=device, producer_event=event)
        return batch_records, [as_numpy(out) for out in outs]

    def postprocess(item) -> int:
        batch_records, host = item
        for i, record in enumerate(batch_records):
            put_blobs(task.postprocess(tuple(h[i] for h in host), record))
        clock.end()
        return len(batch_records)

    pools = {"load": config.decode_pool_size, "postprocess": config.postprocess_threads}
    executors = {name: ThreadPoolExecutor(n, thread_name_prefix=f"spdl-{name}") for name, n in pools.items()}
    for name in ("collate", "h2d", "forward", "d2h"):
        executors[name] = ThreadPoolExecutor(1, thread_name_prefix=f"spdl-{name}")
    builder = PipelineBuilder().add_source(records)
    if remote:
        builder = (builder.pipe(fetch, concurrency=config.fetch_concurrency, name="fetch")
                   .pipe(preprocess, concurrency=pools["load"], executor=executors["load"], name="load"))
    else:
        builder = builder.pipe(load, concurrency=pools["load"], executor=executors["load"], name="load")
    builder = (builder
               .aggregate(config.batch_size)
               .pipe(collate, executor=executors["collate"], name="collate")
               .pipe(h2d, executor=executors["h2d"], name="h2d")
               .pipe(forward, executor=executors["forward"], name="forward")
               .pipe(d2h, executor=executors["d2h"], name="d2h")
               .pipe(postprocess, concurrency=pools["postprocess"], executor=executors["postprocess"],
                     name="postprocess")
               .add_sink())
    pipeline = builder.build(num_threads=1, max_failures=0, queue_class=_queue_stats(stages),
                             task_hook_factory=_task_stats(stages))
    done = 0
    start = time.perf_counter()
    try:
        with pipeline.auto_stop():
            for n in pipeline.get_iterator(timeout=600):
                done += n
    finally:
        for executor in executors.values():
            executor.shutdown()
    end = time.perf_counter()
    busy = {name: round(s["tasks"] * s["ave_s"], 3) for name, s in stages.items() if "ave_s" in s}
    batches = stages.get("forward", {}).get("tasks")
    return Run(done, end - start, clock.first or start, clock.last or end, busy, batches,
               round(done / batches, 1) if batches else None, stages)


def _on_side_stream(fn: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """fn() on this thread's own CUDA stream, waited for (as spdl.io.transfer_tensor_h2d does its copies)."""
    stream = _SIDE_STREAMS.setdefault(threading.get_ident(), torch.cuda.Stream(device))
    with torch.cuda.stream(stream):
        out = fn()
    stream.synchronize()
    return out


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _stage_name(info) -> str:
    """The name given to pipe() (or SPDL's own, for its source, aggregate and sink stages) from a StageInfo."""
    return info.stage_name


def _task_stats(stages: dict[str, dict[str, float]]):
    """A task_hook_factory: SPDL's TaskStatsHook per stage, its final figures kept in `stages` instead of logged."""
    from spdl.pipeline import TaskStatsHook

    class Kept(TaskStatsHook):
        def _log_stats(self, stats) -> None:
            stages.setdefault(_stage_name(self.info), {}).update(
                tasks=stats.num_tasks, failures=stats.num_failures, ave_s=stats.ave_time, p90_s=stats.p90_time,
                p99_s=stats.p99_time)

    return lambda info: [Kept(info)]


def _queue_stats(stages: dict[str, dict[str, float]]):
    """A queue_class: SPDL's StatsQueue, its occupancy (the share of time the queue feeding a stage held an item)
    kept in `stages`."""
    from spdl.pipeline import StatsQueue

    class Kept(StatsQueue):
        def _log_stats(self, stats) -> None:
            stages.setdefault(_stage_name(self.info), {}).update(
                queue_occupancy=round(stats.occupancy_rate, 3), queue_items=stats.num_items)

    return Kept
