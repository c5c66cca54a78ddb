"""Competitor `spdl`: the seed's own pipeline, SPDL's `spdl.pipeline.PipelineBuilder` run as a plain script without
Beam, on the same task, data, batch size and thread counts as beam_infer. SPDL (`spdl==0.8.0`) is a benchmark
dependency (the `bench` extra), imported when the competitor runs."""

from __future__ import annotations

import importlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from beam_infer import EngineConfig
from beam_infer.engine import as_numpy, load_on_device
from beam_infer.io.fetch import fetch_bytes
from beam_infer.io.gcs_env import prepare_gcsfs, storage_options
from beam_infer.io.put import is_local_uri
from beam_infer.task import InferenceTask, Preprocessed, Record, record_id
from benchmarks.competitors import Clock, Run, put_blobs


def spdl(task: InferenceTask, config: EngineConfig, records: list[Record], output: str) -> Run:
    """SPDL's pipeline (`spdl.pipeline.PipelineBuilder`), as its "Building an inference pipeline" guide builds one:

    records → fetch and preprocess on a pool of beam_infer's decode-thread count (local files are read there, as
    beam_infer's engine reads them in its decode pool; remote objects are fetched before, by coroutines of fsspec's
    async filesystem on SPDL's event loop, `fetch_concurrency` at a time over as many connections, with gcsfs's own
    retries, as an SPDL user would) → aggregate(batch_size) → collate (on CUDA into pinned memory, which
    `spdl.io.transfer_tensor_h2d` then copies from as it is) → H2D (`transfer_tensor_h2d`: a side stream; or the
    task's device_preprocess on one) → forward → D2H (`spdl.io.transfer_tensor_d2h`, after the forward's event) →
    postprocess on a pool of beam_infer's postprocess-thread count (Blobs written as the other competitors write
    them) → the rows, written to `<output>/predictions.parquet` batch by batch as they come out. One thread per GPU
    stage, as SPDL's guide advises. Each stage may have twice its threads' count of tasks in flight, so that a
    thread finds its next record queued. SPDL's own per-stage task stats and output-queue occupancy go into
    `Run.stages`.

    Raises:
        RuntimeError: a stage failed (SPDL's error), or records went missing.
    """
    from spdl.pipeline import PipelineBuilder

    model, device, _ = load_on_device(task, config)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index != rank:  # spdl.io's H2D copies go to LOCAL_RANK's device
            raise ValueError(f"the spdl competitor runs on LOCAL_RANK's device (cuda:{rank}), not {device}")
    spdl_io = importlib.import_module("spdl.io") if cuda else None  # its transfers need CUDA
    clock = Clock()
    stages: dict[str, dict[str, float]] = {}
    remote = bool(records) and bool(records[0].get("uri")) and not is_local_uri(records[0]["uri"])
    padded = [0]  # elements collated, padding included (variable-length inputs)
    prepare_gcsfs()  # under STORAGE_EMULATOR_HOST: no wait on Google's storage-control API
    fetcher = _AsyncFetch(len(records), config.fetch_concurrency)
    side = threading.local()  # each H2D thread's own CUDA stream for device_preprocess

    def load(record: Record) -> tuple[Record, np.ndarray]:
        if not record.get("uri") and task.inline_field is not None:  # the record carries its input (a text)
            return preprocess((record, record[task.inline_field]))
        return preprocess((record, fetch_bytes(record["uri"])))

    def preprocess(item: tuple[Record, Any]) -> tuple[Record, np.ndarray]:
        clock.start()
        record, data = item
        value = task.preprocess(data, record)
        if isinstance(value, Preprocessed):  # fields for the postprocess, as beam_infer's engine passes them
            return {**record, **value.fields}, np.asarray(value.array)
        return record, value

    def collate(items: list[tuple[Record, np.ndarray]]):
        batch_records = [r for r, _ in items]
        arrays = [a for _, a in items]
        if task.device_preprocess is not None:
            return batch_records, [torch.from_numpy(np.require(a, requirements="W")) for a in arrays]
        if task.pad_value is not None:  # variable lengths: the batch, in arrival order, padded to its longest
            width = max(a.shape[0] for a in arrays)
            stacked = np.full((len(arrays), width, *arrays[0].shape[1:]), task.pad_value, dtype=arrays[0].dtype)
            for row, a in zip(stacked, arrays, strict=True):
                row[:a.shape[0]] = a
            padded[0] += stacked.shape[0] * stacked.shape[1]
            arrays = list(stacked)
        if not cuda:
            return batch_records, torch.from_numpy(np.stack(arrays))
        batch = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype,
                            pin_memory=True)  # torch's pinned cache reuses it once its copy is done
        np.stack(arrays, out=batch.numpy())
        return batch_records, batch

    def h2d(item):
        batch_records, host = item
        if task.device_preprocess is None:
            return batch_records, spdl_io.transfer_tensor_h2d(host) if cuda else host
        if not cuda:  # the CPU stand-in for nvJPEG (the smoke runs)
            return batch_records, task.device_preprocess(host, device)
        if not hasattr(side, "stream"):
            side.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(side.stream):
            x = task.device_preprocess(host, device)
        side.stream.synchronize()  # as transfer_tensor_h2d does its copies
        return batch_records, x

    def forward(item):
        batch_records, x = item
        with torch.inference_mode():
            outs = model(x)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        event = None
        if cuda:
            stream = torch.cuda.current_stream(device)
            x.record_stream(stream)  # made on another stream: not reused until this forward has read it
            event = torch.cuda.Event()
            event.record(stream)
        return batch_records, outs, event

    def d2h(item):
        batch_records, outs, event = item
        if cuda:
            outs = spdl_io.transfer_tensor_d2h(outs, device=device, producer_event=event)
        return batch_records, [as_numpy(out) for out in outs]

    def postprocess(item) -> list[dict[str, Any]]:
        batch_records, host = item
        rows = []
        for i, record in enumerate(batch_records):
            value = task.postprocess(tuple(h[i] for h in host), record)
            clock.end()
            rows.append({**record, "id": record_id(record), "model": task.name, **put_blobs(value)})
        return rows

    pools = {"load": config.decode_pool_size, "postprocess": config.postprocess_threads}
    executors = {name: ThreadPoolExecutor(n, thread_name_prefix=f"spdl-{name}") for name, n in pools.items()}
    for name in ("collate", "h2d", "forward", "d2h"):
        executors[name] = ThreadPoolExecutor(1, thread_name_prefix=f"spdl-{name}")
    builder = PipelineBuilder().add_source(records)
    if remote:
        builder = (builder.pipe(fetcher, concurrency=config.fetch_concurrency, name="fetch")
                   .pipe(preprocess, concurrency=2 * pools["load"], executor=executors["load"], name="load"))
    else:
        builder = builder.pipe(load, concurrency=2 * pools["load"], executor=executors["load"], name="load")
    builder = (builder
               .aggregate(config.batch_size)
               .pipe(collate, executor=executors["collate"], name="collate")
               .pipe(h2d, executor=executors["h2d"], name="h2d")
               .pipe(forward, executor=executors["forward"], name="forward")
               .pipe(d2h, executor=executors["d2h"], name="d2h")
               .pipe(postprocess, concurrency=2 * pools["postprocess"], executor=executors["postprocess"],
                     name="postprocess")
               .add_sink())
    pipeline = builder.build(num_threads=1, max_failures=0, queue_class=_queue_stats(stages),
                             task_hook_factory=_task_stats(stages))
    done = 0
    writer = None
    start = time.perf_counter()
    try:
        with pipeline.auto_stop():
            for rows in pipeline.get_iterator(timeout=600):
                table = pa.Table.from_pylist(rows, schema=writer.schema if writer else None)
                writer = writer or pq.ParquetWriter(os.path.join(output, "predictions.parquet"), table.schema)
                writer.write_table(table)
                done += len(rows)
    finally:
        if writer is not None:
            writer.close()
        for executor in executors.values():
            executor.shutdown()
    end = time.perf_counter()
    if done != len(records):
        raise RuntimeError(f"spdl: {done} rows for {len(records)} records")
    busy = {name: round(s["tasks"] * s["ave_s"], 3) for name, s in stages.items() if "ave_s" in s}
    batches = stages.get("forward", {}).get("tasks")
    return Run(done, end - start, clock.first or start, clock.last or end, busy, batches,
               round(done / batches, 1) if batches else None, stages,
               counters={"padded_tokens": padded[0]} if padded[0] else {})


class _AsyncFetch:
    """The fetch stage for remote records: a coroutine per record on SPDL's event loop, through an async fsspec
    filesystem per protocol made on that loop (gcsfs over a pool of `connections`), whose sessions close once the
    last of `total` records was fetched (the loop ends with the pipeline)."""

    def __init__(self, total: int, connections: int) -> None:
        self.total, self.connections = total, connections
        self.filesystems: dict[str, Any] = {}
        self.finished = 0

    async def __call__(self, record: Record) -> tuple[Record, bytes]:
        protocol, path = record["uri"].split("://", 1)
        try:
            fs = self.filesystems.get(protocol) or await self._open(protocol, record["uri"])
            return record, await fs._cat_file(path)
        finally:
            self.finished += 1
            if self.finished == self.total:
                for fs in self.filesystems.values():
                    session = getattr(fs, "_session", None)
                    if session is not None:
                        await session.close()

    async def _open(self, protocol: str, uri: str) -> Any:
        options: dict[str, Any] = dict(storage_options(uri))
        if protocol in ("gs", "gcs"):
            options["session_kwargs"] = {"connector": aiohttp.TCPConnector(limit=self.connections)}
        fs = fsspec.filesystem(protocol, asynchronous=True, skip_instance_cache=True, **options)
        if hasattr(fs, "set_session"):
            await fs.set_session()
        self.filesystems[protocol] = fs
        return fs


def _task_stats(stages: dict[str, dict[str, float]]):
    """A task_hook_factory: SPDL's TaskStatsHook per stage, its final figures kept in `stages` instead of logged."""
    from spdl.pipeline import TaskStatsHook

    class Kept(TaskStatsHook):
        def _log_stats(self, stats) -> None:
            stages.setdefault(self.info.stage_name, {}).update(
                tasks=stats.num_tasks, failures=stats.num_failures, ave_s=stats.ave_time, p90_s=stats.p90_time,
                p99_s=stats.p99_time)

    return lambda info: [Kept(info)]


def _queue_stats(stages: dict[str, dict[str, float]]):
    """A queue_class: SPDL's StatsQueue, kept in `stages` under the stage that writes to it: `queue_occupancy`,
    the share of time that stage's output queue held an item (near 1: the next stage always had work waiting). The
    aggregate stage takes its input without the queue's accounting, so `load`'s figures undercount there."""
    from spdl.pipeline import StatsQueue

    class Kept(StatsQueue):
        def _log_stats(self, stats) -> None:
            stages.setdefault(self.info.stage_name, {}).update(
                queue_occupancy=round(stats.occupancy_rate, 3), queue_items=stats.num_items)

    return Kept
