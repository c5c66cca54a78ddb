"""beam_infer's own cost per record, beyond Beam's, on the CPU.

    python -m benchmarks.overhead [--items 20000] [--repeats 3] [--json PATH]

Two pipelines of the same shape over the same records (4-byte files; a no-op model), on the in-process
DirectRunner:
    beam_only   Read → Reshuffle → ParDo(fetch → preprocess → postprocess, one record at a time) → the writes
    beam_infer  `pipelines.run.run_job`: Read → Reshuffle → RunGpuInference → the same writes
Both do the task's per-record work; the difference, divided by the records, is what the engine adds: its
thread hand-offs, batching and bookkeeping. Each pipeline runs `repeats` times, alternating; the best of each
is kept (the least disturbed by the rest of the machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
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

    def process(self, record):
        array = NOOP_TASK.preprocess(fetch_bytes(record["uri"]), record)
        yield {**record, "id": record_id(record), "model": NOOP_TASK.name, **NOOP_TASK.postprocess((array,), record)}


def beam_only(manifest: str, output: str) -> float:
    start = time.perf_counter()
    with beam.Pipeline(runner=InProcessDirectRunner(), options=PipelineOptions([])) as pipeline:
        records = pipeline | "Read" >> ReadRecords(manifest) | "Spread" >> beam.Reshuffle()
        results = records | "Infer" >> beam.ParDo(_PerRecord()).with_outputs(DEAD_LETTERS, main=PREDICTIONS)
        results[PREDICTIONS] | "WritePredictions" >> WritePredictions(output, NOOP_TASK.output_schema)
        results[DEAD_LETTERS] | "WriteDeadLetters" >> WriteDeadLetters(output)
        results[PREDICTIONS] | "ScoreTop1" >> beam.Map(lambda row: None)
    return time.perf_counter() - start


def with_engine(manifest: str, output: str, config: EngineConfig) -> float:
    from pipelines.run import run_job

    summary = run_job(PipelineOptions([]), manifest, NOOP_TASK, config, output)
    return summary.seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    manifest = dataset("number", 1, 1, args.items)
    config = EngineConfig(batch_size=args.batch_size, device="cpu")
    times: dict[str, list[float]] = {"beam_only": [], "beam_infer": []}
    for _ in range(args.repeats):
        for name in times:
            output = tempfile.mkdtemp(prefix="beam_infer_overhead_")
            try:
                times[name].append(beam_only(manifest, output) if name == "beam_only"
                                   else with_engine(manifest, output, config))
            finally:
                shutil.rmtree(output, ignore_errors=True)
    best = {name: min(ts) for name, ts in times.items()}
    per_record_us = (best["beam_infer"] - best["beam_only"]) / args.items * 1e6
    result = {
        "device": describe_device(torch.device("cpu")), "date": datetime.date.today().isoformat(),
        "commit": git_commit(), "scenario": "overhead", "items": args.items, "batch_size": args.batch_size,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "beam_us_per_record": round(best["beam_only"] / args.items * 1e6, 1),
        "beam_infer_extra_us_per_record": round(per_record_us, 1),
    }
    print(f"overhead on {result['device']} ({result['date']}): {args.items} records, best of {args.repeats}: "
          f"Beam alone {best['beam_only']:.2f}s ({result['beam_us_per_record']} µs/record), with beam_infer's "
          f"engine {best['beam_infer']:.2f}s: the engine adds {per_record_us:.1f} µs per record")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
