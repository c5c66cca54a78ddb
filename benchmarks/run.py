"""Benchmarks side by side, in one process and one run: the bounds, then naive, runinference, spdl and beam_infer
(with --repeats N, N rounds of them in turn, each competitor's median run reported).

    python -m benchmarks.run --scenario classify-cpu-decode --device cuda --json results.json
    python -m benchmarks.run --scenario img2img --device cpu --items 16 --batch-size 4 --image-size 64
    python -m benchmarks.run --scenario classify-cpu-decode --model one_pixel --competitors spdl,beam_infer --repeats 3
    python -m benchmarks.run --scenario remote-fetch --latency-ms 40    # gs:// reads: see benchmarks/remote_fetch.py

Throughput is given twice: end to end (wall time, with Beam's start-up and the Parquet writes for the Beam
competitors) and steady (first record decoded to last record postprocessed). The ratio to the bound uses the
steady figure, as the bounds are steady figures too, and GPU utilisation is averaged over the same steady
window. Memory: peak RSS of the process, its growth during the competitor, and peak GPU memory allocated by
torch during the competitor (nvJPEG's own buffers are not in it). Scenarios are in benchmarks/scenarios.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from beam_infer import EngineConfig
from beam_infer.config import available_cores
from beam_infer.engine import configure_process, load_on_device
from beam_infer.io.fetch import fetch_bytes
from benchmarks import bounds, competitors, spdl_competitor
from benchmarks.data import dataset, read_records
from benchmarks.monitor import Monitor, describe_device
from benchmarks.scenarios import SCENARIOS, Scenario, classifier

COMPETITORS = ("naive", "runinference", "spdl", "beam_infer")
REMOTE_FETCH = "remote-fetch"  # its own module: a GCS server, a latency proxy and other competitors
EMBED = "embed"  # its own module: texts, and the competitors of a text job (benchmarks/embed.py)
_FORWARD_BATCHES_MAX = 20


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True, choices=sorted([*SCENARIOS, REMOTE_FETCH, EMBED]))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--items", type=int, help="records per competitor (default: the scenario's)")
    parser.add_argument("--batch-size", type=int, help="default: the scenario's (256)")
    parser.add_argument("--image-size", type=int,
                        help="override the input images' width and height (small CPU smoke runs)")
    parser.add_argument("--competitors", default=",".join(COMPETITORS), help="comma-separated subset to run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of spdl and beam_infer in turn (naive and runinference run in the first only); "
                             "each competitor's median run (by steady records/s) is reported, with every run's "
                             "figure (default: %(default)s)")
    parser.add_argument("--slow-items", type=int,
                        help="run naive and runinference on only this many of the records (they are slow; "
                             "their records/s stay comparable); default: all")
    parser.add_argument("--model", help="classify scenarios: the classifier instead of ResNet-50, torchvision:<name> "
                                            "or one_pixel (next to no compute: the run is decode-bound anywhere); "
                                            "embed: a sentence-transformers directory, random weights where it has "
                                            "no model.safetensors (default: the shipped all-MiniLM-L6-v2)")
    parser.add_argument("--decode-threads", type=int, default=0,
                        help="beam_infer's decode threads (default 0: a thread per core)")
    parser.add_argument("--gil-switch-interval", type=float, default=EngineConfig.gil_switch_interval_s,
                        help="beam_infer's EngineConfig.gil_switch_interval_s (default: %(default)s s; Python's "
                             "own is 0.005)")
    parser.add_argument("--latency-ms", type=int, default=40,
                        help="remote-fetch: the latency the proxy adds to every request (default: %(default)s)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.scenario == EMBED and args.competitors == ",".join(COMPETITORS):
        args.competitors = "default"  # the embed scenario's own list
    unknown = set(args.competitors.split(",")) - set(COMPETITORS)
    if unknown and args.scenario != EMBED:
        parser.error(f"unknown competitors {sorted(unknown)}: choose among {', '.join(COMPETITORS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def git_commit() -> str:
    if os.environ.get("BEAM_INFER_COMMIT"):
        return os.environ["BEAM_INFER_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure_bounds(scenario: Scenario, config: EngineConfig, manifest: str, output: str) -> dict[str, float]:
    records = read_records(manifest)
    task = scenario.task(output)
    device = config.torch_device()
    decode_bound = scenario.bound == "cpu_decode_or_forward" or task.device_preprocess is not None
    payloads = [fetch_bytes(r["uri"]) for r in (records if decode_bound else records[:config.batch_size])]
    model, _, _ = load_on_device(task, config)
    batch = bounds.device_batch(task, payloads[:config.batch_size], records[:config.batch_size], device)
    steps = max(3, min(_FORWARD_BATCHES_MAX, len(records) // config.batch_size))
    out = {"forward_only": bounds.forward_only(model, batch, steps)}
    del model, batch
    if scenario.bound == "cpu_decode_or_forward":
        out["cpu_decode"] = bounds.cpu_decode(task, payloads, records, available_cores())
    if task.device_preprocess is not None:
        out["device_decode"] = bounds.device_decode(task, payloads, records, device, config.batch_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def scratch_parent(scenario: Scenario, items: int) -> str | None:
    """/dev/shm (memory, so the writes cost no disk time) when it has room for every output, else the temp dir."""
    _, width, height = scenario.data
    needed = 2 * items * width * height * 3  # img2img writes an image per record; the others much less
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > needed else None
    except OSError:
        return None


def first_records(manifest: str, count: int | None, folder: str) -> str:
    """A manifest of the first `count` records of `manifest` (the manifest itself when count is None)."""
    if count is None:
        return manifest
    path = os.path.join(folder, f"first-{count}.jsonl")
    with open(manifest) as src, open(path, "w") as dst:
        dst.writelines(itertools.islice(src, count))
    return path


def run_competitor(name: str, scenario: Scenario, config: EngineConfig, manifest: str,
                   output: str) -> competitors.Run:
    if name == "naive":
        return competitors.naive(scenario.task(output), config, read_records(manifest))
    if name == "runinference":  # RunInference's handlers take stackable tensors: it decodes on the CPU
        return competitors.runinference(scenario.task(output, decode="cpu"), config, manifest, output)
    if name == "spdl":
        return spdl_competitor.spdl(scenario.task(output), config, read_records(manifest), output)
    return competitors.beam_infer(scenario.task(output), config, manifest, output)


def measure(name: str, scenario: Scenario, config: EngineConfig, manifest: str, output: str,
            device: torch.device, bound: float) -> dict[str, Any]:
    """One run of competitor `name`, as a result row."""
    gc.collect()  # what the competitor before left behind is not this one's to free
    if device.type == "cuda":
        torch.cuda.empty_cache()
    os.makedirs(output)
    try:
        with Monitor(device) as monitor:
            run = run_competitor(name, scenario, config, manifest, output)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    usage = monitor.usage_between(run.steady_start, run.steady_end)
    steady = run.records / run.steady_seconds if run.steady_seconds > 0 else 0.0
    row = {
        "name": name, "records": run.records, "seconds": round(run.seconds, 3),
        "records_per_s": round(run.records / run.seconds, 1),
        "steady_records_per_s": round(steady, 1), "ratio_to_bound": round(steady / bound, 3),
        "gpu_util_pct": None if usage.gpu_util_pct is None else round(usage.gpu_util_pct, 1),
        "busy_s": {k: round(v, 3) for k, v in run.busy_s.items()},
        "batches": run.batches, "mean_batch_size": run.mean_batch_size,
        "peak_rss_mb": round(usage.peak_rss_mb), "rss_growth_mb": round(usage.rss_growth_mb),
        "peak_gpu_mem_mb": None if usage.peak_gpu_mem_mb is None else round(usage.peak_gpu_mem_mb),
    }
    if run.stages is not None:
        row["stages"] = {stage: {k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()}
                         for stage, figures in run.stages.items()}
    return row


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if theirs else None


def median_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median steady records/s (the lower middle one of an even count), with every run's."""
    ordered = sorted(rows, key=lambda r: r["steady_records_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "steady_runs": [r["steady_records_per_s"] for r in rows]}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    scenario = SCENARIOS[args.scenario]
    if args.image_size:
        scenario = dataclasses.replace(scenario, data=(scenario.data[0], args.image_size, args.image_size))
    if args.model:
        if not scenario.name.startswith("classify"):
            raise SystemExit(f"--model applies to the classify scenarios, not {scenario.name}")
        scenario = dataclasses.replace(scenario, make_task=classifier(args.model))
    items = args.items or scenario.default_items
    config = EngineConfig(batch_size=args.batch_size or scenario.batch_size, device=args.device,
                          channels_last=scenario.channels_last and args.device.startswith("cuda"),
                          decode_threads=args.decode_threads, gil_switch_interval_s=args.gil_switch_interval)
    device = config.torch_device()
    configure_process(config, device)  # as beam_infer's engine will: the bounds and every competitor run so
    manifest = dataset(scenario.data[0], scenario.data[1], scenario.data[2], items)
    scratch = tempfile.mkdtemp(prefix="beam_infer_bench_", dir=scratch_parent(scenario, items))
    try:
        bound_dir = os.path.join(scratch, "bounds")
        os.makedirs(bound_dir)
        measured = measure_bounds(scenario, config, manifest, bound_dir)
        bound_name, bound = scenario.relevant_bound(measured)
        slow_manifest = first_records(manifest, args.slow_items, scratch)
        names = args.competitors.split(",")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            # in turn, the order reversed every other round, so that neither a slow phase of the machine nor
            # coming first (the allocators still growing) falls on one competitor
            for name in (names if round_ % 2 == 0 else names[::-1]):
                fast = name in ("spdl", "beam_infer")
                if round_ > 0 and not fast:
                    continue  # naive and runinference are there for scale: once is enough
                runs[name].append(measure(name, scenario, config, manifest if fast else slow_manifest,
                                          os.path.join(scratch, f"{name}-{round_}"), device, bound))
        rows = [median_run(runs[name]) for name in names]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "device": describe_device(device), "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "scenario": scenario.name, "model": scenario.task(tempfile.gettempdir()).name, "items": items,
        "batch_size": config.batch_size,
        "decode_threads": config.decode_pool_size, "cores": available_cores(),
        "gil_switch_interval_s": sys.getswitchinterval(),
        "dtype": str(config.torch_dtype(device)).removeprefix("torch."), "image": list(scenario.data),
        "torch": torch.__version__, "bounds": {k: round(v, 1) for k, v in measured.items()},
        "bound": {"name": bound_name, "records_per_s": round(bound, 1)}, "repeats": args.repeats,
        "competitors": rows,
    }
    if "spdl" in runs and "beam_infer" in runs:  # per round, then of the medians
        result["beam_infer_over_spdl"] = {
            "rounds": [_ratio(b["steady_records_per_s"], s["steady_records_per_s"])
                       for b, s in zip(runs["beam_infer"], runs["spdl"], strict=True)],
            "medians": _ratio(rows[names.index("beam_infer")]["steady_records_per_s"],
                              rows[names.index("spdl")]["steady_records_per_s"])}
    if device.type == "cuda":
        result["targets"] = [target.check(result) for target in scenario.targets]
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"{result['scenario']} on {result['device']} ({result['date']}, commit {result['commit'][:10]}): "
             f"{result['items']} records, batch {result['batch_size']}, {result['dtype']}",
             "bounds (records/s): " + ", ".join(f"{k} {v:,.1f}" for k, v in result["bounds"].items())
             + f"; held against: {result['bound']['name']} {result['bound']['records_per_s']:,.1f}",
             f"{'competitor':<13}{'records':>8}{'rec/s e2e':>11}{'rec/s steady':>14}{'x bound':>9}{'GPU %':>7}"
             f"{'RSS MB':>8}{'GPU MB':>8}  busy s per stage"]
    for c in result["competitors"]:
        util = "-" if c["gpu_util_pct"] is None else f"{c['gpu_util_pct']:.0f}"
        gpu_mem = "-" if c["peak_gpu_mem_mb"] is None else str(c["peak_gpu_mem_mb"])
        busy = " ".join(f"{k} {v:.2f}" for k, v in c["busy_s"].items()) or "-"
        lines.append(f"{c['name']:<13}{c['records']:>8}{c['records_per_s']:>11,.1f}{c['steady_records_per_s']:>14,.1f}"
                     f"{c['ratio_to_bound']:>9.3f}{util:>7}{c['peak_rss_mb']:>8}{gpu_mem:>8}  {busy}")
    if "beam_infer_over_spdl" in result:
        ratio = result["beam_infer_over_spdl"]
        lines.append(f"beam_infer / spdl, steady records/s: {ratio['medians']:.3f} (medians); per round: "
                     + ", ".join(f"{r:.3f}" for r in ratio["rounds"]))
    for t in result.get("targets", []):
        value = "n/a" if t["value"] is None else f"{t['value']:,.2f}"
        lines.append(f"target {t['target']} >= {t['minimum']:,}: {value} ({'met' if t['met'] else 'MISSED'})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.scenario in (REMOTE_FETCH, EMBED):
        import importlib

        module = importlib.import_module(f"benchmarks.{args.scenario.replace('-', '_')}")
        result = module.benchmark(args)
        print(module.render(result), flush=True)
    else:
        result = benchmark(args)
        print(render(result), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
