"""beam_infer's own cost per record, beyond Beam's, on the CPU.

    python -m benchmarks.overhead [--items 20000] [--repeats 5] [--chunk-size 64] [--json PATH]

Two pipelines of the same shape over the same records (4-byte files; a no-op model), on the in-process
DirectRunner:
    beam_only   Read → Reshuffle → ParDo(fetch → preprocess → postprocess, one record at a time) → the writes
    beam_infer  `pipelines.run.run_job`: Read → Reshuffle → RunGpuInference → the same writes
Both read the records in chunks of --chunk-size (1: one record per Beam element up to the inference) and do
the task's per-record work; the difference, divided by the records, is what the engine adds: its thread
hand-offs, batching and bookkeeping. The job's whole cost per record (Beam's and the engine's, all of it Python
that holds the GIL) is printed too: it is what caps one worker process's records/s when nothing else does.
Each pipeline runs once to warm up (imports, first-call costs), then `repeats` times, alternating; the medians
are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from torch import nn

from beam_infer import EngineConfig, InferenceTask, ReadRecords, WriteDeadLetters, WritePredictions
from beam_infer.dofn import DEAD_LETTERS, PREDICTIONS
from beam_infer.io.fetch import fetch_bytes
from beam_infer.runners import InProcessDirectRunner
from beam_infer.task import record_id
from benchmarks.data import dataset
from benchmarks.monitor import describe_device
from benchmarks.run import git_commit
from pipelines.run import DEFAULT_CHUNK_SIZE


def _read_number(data: bytes, record) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).copy()


def _number(outputs, record) -> dict[str, Any]:
    return {"value": float(outputs[0][0])}


class _NoOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


NOOP_TASK = InferenceTask("noop", _NoOp, _read_number, _number, pa.schema([("value", pa.float32())]))


class _PerRecord(beam.DoFn):
    """The task's per-record work without the engine: fetch, preprocess, postprocess, inline."""

    def process(self, element):
        for record in element if isinstance(element, list) else (element,):
            array = NOOP_TASK.preprocess(fetch_bytes(record["uri"]), record)
            yield {**record, "id": record_id(record), "model": NOOP_TASK.name,
                   **NOOP_TASK.postprocess((array,), record)}


def written_rows(output: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in glob.glob(f"{output}/predictions-*.parquet"))


def beam_only(manifest: str, output: str, chunk_size: int | None) -> float:
    start = time.perf_counter()
    with beam.Pipeline(runner=InProcessDirectRunner(), options=PipelineOptions([])) as pipeline:
        records = pipeline | "Read" >> ReadRecords(manifest, chunk_size) | "Spread" >> beam.Reshuffle()
        results = records | "Infer" >> beam.ParDo(_PerRecord()).with_outputs(DEAD_LETTERS, main=PREDICTIONS)
        results[PREDICTIONS] | "WritePredictions" >> WritePredictions(output, NOOP_TASK.output_schema)
        results[DEAD_LETTERS] | "WriteDeadLetters" >> WriteDeadLetters(output)
        results[PREDICTIONS] | "ScoreTop1" >> beam.Map(lambda row: None)
    return time.perf_counter() - start


def with_engine(manifest: str, output: str, config: EngineConfig, chunk_size: int | None) -> float:
    from pipelines.run import Budget, run_job

    summary = run_job(PipelineOptions([]), manifest, NOOP_TASK, config, output, Budget(), chunk_size)
    return summary.seconds


def with_telemetry(manifest: str, output: str, config: EngineConfig, chunk_size: int | None, items: int) -> float:
    """with_engine, the engine sampling its telemetry and the job's progress bar reading it, as `pipelines.run`
    does (the bar, drawn to nowhere, reads the most often)."""
    from pipelines.progress import Progress

    folder = tempfile.mkdtemp(prefix="beam_infer_telemetry_")
    try:
        with open(os.devnull, "w") as nowhere, Progress(folder, items, "bar", stream=nowhere):
            return with_engine(manifest, output, dataclasses.replace(config, telemetry_dir=folder), chunk_size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="records per Beam element up to the inference; 1: one record per element")
    parser.add_argument("--telemetry", action="store_true",
                        help="also run beam_infer with its telemetry and progress bar on, and print what they add")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    manifest = dataset("number", 1, 1, args.items)
    config = EngineConfig(batch_size=args.batch_size, device="cpu")
    chunk = None if args.chunk_size == 1 else args.chunk_size
    names = ["beam_only", "beam_infer"] + (["beam_infer_telemetry"] if args.telemetry else [])
    rows: dict[str, set[int]] = {name: set() for name in names}

    def once(name: str) -> tuple[float, float]:
        """(wall seconds, CPU seconds of every thread of the process) of one run."""
        output = tempfile.mkdtemp(prefix="beam_infer_overhead_")
        cpu = time.process_time()
        try:
            if name == "beam_only":
                wall = beam_only(manifest, output, chunk)
            elif name == "beam_infer":
                wall = with_engine(manifest, output, config, chunk)
            else:
                wall = with_telemetry(manifest, output, config, chunk, args.items)
            cpu = time.process_time() - cpu
            rows[name].add(written_rows(output))
            return wall, cpu
        finally:
            shutil.rmtree(output, ignore_errors=True)

    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in runs:
        once(name)  # warm-up, not counted
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(once(name))
    times = {name: [wall for wall, _ in rs] for name, rs in runs.items()}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in rs) for name, rs in runs.items()}
    per_record_us = (median["beam_infer"] - median["beam_only"]) / args.items * 1e6
    cpu_per_record_us = (cpu["beam_infer"] - cpu["beam_only"]) / args.items * 1e6
    result = {
        "device": describe_device(torch.device("cpu")), "date": datetime.date.today().isoformat(),
        "commit": git_commit(), "scenario": "overhead", "items": args.items, "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "rows_written": {name: sorted(counts) for name, counts in rows.items()},
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "beam_us_per_record": round(median["beam_only"] / args.items * 1e6, 1),
        "beam_infer_extra_us_per_record": round(per_record_us, 1),
        "job_us_per_record": round(median["beam_infer"] / args.items * 1e6, 1),
        "cpu_seconds": {name: [round(c, 3) for _, c in rs] for name, rs in runs.items()},
        "beam_infer_extra_cpu_us_per_record": round(cpu_per_record_us, 1),
    }
    print(f"overhead on {result['device']} ({result['date']}): {args.items} records in chunks of {args.chunk_size}, "
          f"median of {args.repeats}: "
          f"Beam alone {median['beam_only']:.2f}s ({result['beam_us_per_record']} µs/record), with beam_infer's "
          f"engine {median['beam_infer']:.2f}s: the engine adds {per_record_us:.1f} µs per record of wall time "
          f"({cpu_per_record_us:.1f} µs of CPU time, all threads); the whole job: {result['job_us_per_record']} "
          "µs per record")
    if args.telemetry:
        extra = (median["beam_infer_telemetry"] - median["beam_infer"]) / args.items * 1e6
        extra_cpu = (cpu["beam_infer_telemetry"] - cpu["beam_infer"]) / args.items * 1e6
        result["telemetry_extra_us_per_record"] = round(extra, 2)
        result["telemetry_extra_cpu_us_per_record"] = round(extra_cpu, 2)
        print(f"telemetry and progress bar on: {median['beam_infer_telemetry']:.2f}s, {extra:+.2f} µs per record of "
              f"wall time ({extra_cpu:+.2f} µs of CPU time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
