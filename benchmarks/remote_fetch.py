"""Scenario remote-fetch: the classify job reading its images from gs:// on a loopback GCS server, through a proxy
that adds latency to every request, beside Beam's own way of reading files.

    python -m benchmarks.run --scenario remote-fetch --items 3000 --slow-items 200 --json out.json

Competitors, in one process, same server and data:
    beam_infer 0 ms   `pipelines.run.run_job` over a manifest of gs:// URIs, the proxy adding nothing
    beam_infer N ms   the same with --latency-ms added to every request (an object store's 20-50 ms per GET)
    spdl N ms         SPDL's pipeline without Beam (benchmarks/spdl_competitor.py): async fetch on its event loop
    fileio N ms       fileio.MatchFiles | fileio.ReadMatches | Map(read, preprocess): Beam's way, at N ms

The model is `one_pixel` (next to no compute) on small JPEGs, so the fetch is what is measured. Throughput is
steady (first decode to last postprocess; for fileio, first to last read); peak RSS is the process's.
Targets: beam_infer at N ms ≥ 0.8 × its own 0 ms (latency hidden), ≥ 10 × fileio and ≥ 0.95 × spdl at N ms.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import torch
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_infer import EngineConfig
from beam_infer.config import available_cores
from beam_infer.io.gcs_env import prepare_storage_emulator
from beam_infer.runners import InProcessDirectRunner
from benchmarks import competitors, spdl_competitor
from benchmarks.data import dataset, read_records
from benchmarks.monitor import Monitor, describe_device
from benchmarks.run import git_commit
from benchmarks.scenarios import classifier
from tests.gcs.proxy import FaultProxy
from tests.gcs.server import GcsServer

IMAGE = ("jpeg", 160, 120)
_NAMESPACE = "benchmarks"


def _upload(server: GcsServer, bucket: str, items: int) -> list[dict[str, str]]:
    """Uploads the benchmark's JPEGs to `bucket`; returns their records with gs:// URIs."""
    records = []
    for record in read_records(dataset(*IMAGE, items)):
        name = f"images/{os.path.basename(record['uri'])}"
        with open(record["uri"], "rb") as f:
            server.upload(bucket, name, f.read())
        records.append({"id": record["id"], "uri": f"gs://{bucket}/{name}"})
    return records


def _write_manifest(records: list[dict[str, str]], folder: str) -> str:
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


class _ReadAndPreprocess(beam.DoFn):
    """Beam's way: each ReadableFile read in full by the DoFn's thread, then the task's preprocess."""

    def __init__(self, preprocess: Any, clock_id: str) -> None:
        self._preprocess = preprocess
        self._clock_id = clock_id

    def process(self, readable: fileio.ReadableFile):
        clock = competitors._CLOCKS[self._clock_id]  # in-process runner: the benchmark's own clock
        clock.start()
        self._preprocess(readable.read(), {"uri": readable.metadata.path})
        clock.end()
        Metrics.counter(_NAMESPACE, "records").inc()
        yield readable.metadata.path


def fileio_read(pattern: str, preprocess: Any) -> competitors.Run:
    """MatchFiles → ReadMatches → read + preprocess in a ParDo, on the in-process DirectRunner."""
    clock_id, clock = competitors._new_clock()
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner=InProcessDirectRunner(), options=PipelineOptions(prepare_storage_emulator([])))
    _ = (pipeline | fileio.MatchFiles(pattern) | fileio.ReadMatches()
         | beam.ParDo(_ReadAndPreprocess(preprocess, clock_id)))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))["counters"]
    records = sum(c.committed or c.attempted or 0 for c in counters if c.key.metric.name == "records")
    return competitors.Run(records, time.perf_counter() - start, clock.first or 0.0, clock.last or 0.0)


@contextlib.contextmanager
def _emulator_at(url: str) -> Iterator[None]:
    """STORAGE_EMULATOR_HOST=url for the block, as it was afterwards."""
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield
    finally:
        if before is None:
            del os.environ["STORAGE_EMULATOR_HOST"]
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = before


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    items = args.items or 3000
    slow_items = min(args.slow_items or 200, items)
    latency_ms = args.latency_ms
    config = EngineConfig(batch_size=args.batch_size or 64, device="cpu", decode_threads=args.decode_threads)
    task = classifier("one_pixel")("cpu", "", IMAGE[1])
    scratch = tempfile.mkdtemp(prefix="beam_infer_remote_")
    rows = []
    with GcsServer() as server, FaultProxy(server.url) as proxy, _emulator_at(proxy.url):
        prepare_storage_emulator([])
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        records = _upload(server, bucket, items)
        manifest = _write_manifest(records, scratch)
        slow_bucket = f"bench-slow-{uuid.uuid4().hex[:8]}"  # fileio reads a glob: a bucket of slow_items objects
        server.make_bucket(slow_bucket)
        for record in records[:slow_items]:
            name = record["uri"].split("/", 3)[3]
            server.upload(slow_bucket, name, server.download(bucket, name))
        runs = [("beam_infer", 0), ("beam_infer", latency_ms), ("spdl", latency_ms), ("fileio", latency_ms)]
        for name, latency in runs:
            proxy.configure(latency_s=latency / 1000)
            output = os.path.join(scratch, f"{name}-{latency}")
            os.makedirs(output)
            with Monitor(torch.device("cpu")) as monitor:
                if name == "beam_infer":
                    run = competitors.beam_infer(task, config, manifest, output)
                elif name == "spdl":
                    run = spdl_competitor.spdl(task, config, records, output)
                else:
                    run = fileio_read(f"gs://{slow_bucket}/images/*", task.preprocess)
            usage = monitor.usage_between(run.steady_start, run.steady_end)
            steady = run.records / run.steady_seconds if run.steady_seconds > 0 else 0.0
            rows.append({"name": name, "latency_ms": latency, "records": run.records,
                         "seconds": round(run.seconds, 3), "records_per_s": round(run.records / run.seconds, 1),
                         "steady_records_per_s": round(steady, 1), "peak_rss_mb": round(usage.peak_rss_mb),
                         "busy_s": {k: round(v, 3) for k, v in run.busy_s.items()},
                         **({"stages": run.stages} if run.stages is not None else {})})
            shutil.rmtree(output, ignore_errors=True)
        requests = proxy.counts.get("requests")
    shutil.rmtree(scratch, ignore_errors=True)
    ours_0, ours_n, spdl_n, theirs = (row["steady_records_per_s"] for row in rows)
    return {
        "device": describe_device(torch.device("cpu")), "date": datetime.date.today().isoformat(),
        "commit": git_commit(), "scenario": "remote-fetch", "model": task.name, "items": items,
        "slow_items": slow_items, "image": list(IMAGE), "batch_size": config.batch_size,
        "fetch_concurrency": config.fetch_concurrency, "cores": available_cores(),
        "latency_ms": latency_ms, "proxy_requests": requests, "competitors": rows,
        "targets": [
            {"target": f"beam_infer at {latency_ms} ms / beam_infer at 0 ms", "minimum": 0.8,
             "value": round(ours_n / ours_0, 3) if ours_0 else None, "met": bool(ours_0) and ours_n / ours_0 >= 0.8},
            {"target": f"beam_infer / fileio at {latency_ms} ms", "minimum": 10.0,
             "value": round(ours_n / theirs, 1) if theirs else None, "met": bool(theirs) and ours_n / theirs >= 10},
            {"target": f"beam_infer / spdl at {latency_ms} ms", "minimum": 0.95,
             "value": round(ours_n / spdl_n, 3) if spdl_n else None, "met": bool(spdl_n) and ours_n / spdl_n >= 0.95},
        ],
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"remote-fetch on {result['device']} ({result['date']}, commit {result['commit'][:10]}): "
             f"{result['items']} gs:// objects ({result['image'][1]}x{result['image'][2]} JPEG) through a loopback "
             f"GCS server and a latency proxy, model {result['model']}, batch {result['batch_size']}, "
             f"fetch_concurrency {result['fetch_concurrency']}",
             f"{'competitor':<12}{'latency':>8}{'records':>9}{'rec/s e2e':>11}{'rec/s steady':>14}{'RSS MB':>8}"
             "  busy s per stage"]
    for c in result["competitors"]:
        busy = " ".join(f"{k} {v:.2f}" for k, v in c["busy_s"].items()) or "-"
        lines.append(f"{c['name']:<12}{c['latency_ms']:>6}ms{c['records']:>9}{c['records_per_s']:>11,.1f}"
                     f"{c['steady_records_per_s']:>14,.1f}{c['peak_rss_mb']:>8}  {busy}")
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:,.2f}"
        lines.append(f"target {t['target']} >= {t['minimum']:,}: {value} ({'met' if t['met'] else 'MISSED'})")
    return "\n".join(lines)
