"""The inference job: read records → spread → GPU-resident inference → Parquet (and, for img2img, images).

    python -m pipelines.run                      # classify the built-in sample: DirectRunner, no network, CPU or GPU
    python -m pipelines.run --task img2img       # sharpen it: <output>/images/*.png and an index-*.parquet of them
    python -m pipelines.run --task embed         # embed a generated corpus of texts with all-MiniLM-L6-v2
    python -m pipelines.run --input 'gs://bucket/images/*.jpg' --output gs://bucket/out \
        --runner DataflowRunner --project … --region …

Every option this script does not know passes through to Beam as a pipeline option.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_infer import (
    EngineConfig,
    InferenceTask,
    ReadRecords,
    RunGpuInference,
    WriteDeadLetters,
    WritePredictions,
    monitor,
    report,
    resolve_task,
)
from beam_infer.budget import Budget, FailureBudget
from beam_infer.dofn import METRICS_NAMESPACE
from beam_infer.engine.engine import STAGES
from beam_infer.io.fetch import is_local
from beam_infer.io.gcs_env import prepare_storage_emulator
from beam_infer.models import DEFAULT_IMG2IMG_MODEL, DEFAULT_MODEL, resolve_img2img_task, with_weights
from beam_infer.runners import resolve_runner
from beam_infer.sample import write_sample
from beam_infer.tasks.classify import DECODE_PLACES
from beam_infer.tasks.embed import DEFAULT_EMBED_MODEL, DEFAULT_TEXT_FIELD, text_embedder
from beam_infer.text_sample import write_text_sample
from pipelines import interrupt, progress
from pipelines.console import configure_logging, first_error
from pipelines.dataflow import add_dataflow_arguments, dataflow_args, log_dataflow_job_id
from pipelines.validate import UsageError, check_job, check_model_name, is_user_factory

_LOG = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 64
TASKS = ("classify", "img2img", "embed")
ROWS = {"classify": "predictions", "img2img": "index", "embed": "embeddings"}  # each task's Parquet file prefix
IMAGES = "images"  # img2img writes its output images under <output>/images/
IMAGE_FORMAT = "png"
# The options of one task only, with their defaults; given with the other task, they are an error.
TASK_OPTIONS = {
    "classify": {"top_k": 3, "decode": "cpu"},
    "img2img": {"image_size": 128},  # 128² keeps the built-in sample at a few seconds on a CPU
    "embed": {"text_field": DEFAULT_TEXT_FIELD, "max_tokens": 16384},
}
DEFAULT_MODELS = {"classify": DEFAULT_MODEL, "img2img": DEFAULT_IMG2IMG_MODEL, "embed": DEFAULT_EMBED_MODEL}
# Records per batch; the embed job's batches are bounded by --max-tokens too, so they hold up to 256 short texts.
BATCH_SIZES = {"classify": 64, "img2img": 64, "embed": 256}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors said as pipelines.validate says its own: one line, exit status 2."""

    def error(self, message: str):
        print(f"beam_infer: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = _Parser(prog="python -m pipelines.run", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", help="a glob of images (local or fsspec URL) or a Parquet/CSV/JSONL manifest "
                                       "with a 'uri' column (embed: a text column, see --text-field, or a 'uri' of "
                                       "UTF-8 files); default: a generated sample")
    group.add_argument("--sample-size", type=int, default=512, help="images (embed: texts) in the generated sample")
    group.add_argument("--text-field", help=f"embed: the manifest's column of texts (default "
                                            f"{DEFAULT_TEXT_FIELD}); an 'id' column is optional")
    group = parser.add_argument_group("model")
    group.add_argument("--task", default="classify", choices=TASKS,
                       help="classify: top-k labels per image; img2img: an image per image, of the same size; "
                            "embed: a normalised embedding per text")
    group.add_argument("--model", help=f"classify: {DEFAULT_MODEL} (default), torchvision:<name> or module:function "
                                       "returning an InferenceTask; img2img: unsharp (default), blur or "
                                       "module:function returning a float NCHW model of images in [0, 1]; embed: "
                                       f"{DEFAULT_EMBED_MODEL} (default, shipped) or a local sentence-transformers "
                                       "directory")
    group.add_argument("--weights", help="a state_dict (torch.save) for the model, local or a URL such as "
                                         "gs://bucket/model.pt; read with weights_only=True on each worker")
    group.add_argument("--top-k", type=int, help="classify: labels kept per image (default 3)")
    group.add_argument("--decode", choices=DECODE_PLACES,
                       help="classify: decode images on CPU threads (default; any format PIL reads) or on the "
                            "device (nvJPEG on CUDA, JPEG only)")
    group.add_argument("--image-size", type=int,
                       help="img2img: inputs (the sample's too) are resized to this square size, and the output "
                            f"images have it (default {TASK_OPTIONS['img2img']['image_size']})")
    group = parser.add_argument_group("engine")
    group.add_argument("--batch-size", type=int, help="records per batch (default 64; embed 256)")
    group.add_argument("--max-tokens", type=int,
                       help="embed: the most padded tokens in a batch (records x its longest text, rounded up to 8; "
                            f"default {TASK_OPTIONS['embed']['max_tokens']}; 0: no budget)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    group.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                       help="records per Beam element from the read to the inference: Beam's per-element cost is "
                            "paid once per chunk, and a chunk is what Reshuffle spreads over workers")
    group = parser.add_argument_group("output")
    group.add_argument("--output", default="beam_infer_output", help="directory or URL for the Parquet files "
                                                                     "(and img2img's images/)")
    group.add_argument("--report", help="write a report of the run: report.html (one self-contained page: summary, "
                                        "records/s, stage timeline, queue fill, batch sizes, GPU, the bottleneck) "
                                        "or report.json (the same data)")
    group.add_argument("--progress", choices=progress.MODES, default="auto",
                       help="live progress on stderr: a bar on a terminal, else (auto, log) a line every "
                            "--progress-every seconds; off: none")
    group.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                       help="seconds between progress lines when stderr is not a terminal (default 10)")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="beam_infer's own logging: -v info, -vv debug (default: warnings only; Beam's own "
                            "loggers stay at warning)")
    group = parser.add_argument_group("failure budget")
    group.add_argument("--max-dead-letters", type=int,
                       help="fail the job when more records than this become dead letters (default: no limit)")
    group.add_argument("--max-dead-letter-fraction", type=float,
                       help="fail the job when more than this fraction (0-1) of the records fail (default: no limit)")
    group = parser.add_argument_group("runner", "any other option is passed to Beam as a pipeline option")
    group.add_argument("--runner", default="DirectRunner")
    add_dataflow_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    for task, options in TASK_OPTIONS.items():
        for name, default in options.items():
            if task == args.task and getattr(args, name) is None:
                setattr(args, name, default)
            elif task != args.task and getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} is an option of --task {task}, not {args.task}")
    args.model = args.model or DEFAULT_MODELS[args.task]
    args.batch_size = args.batch_size if args.batch_size is not None else BATCH_SIZES[args.task]
    if is_local(args.output):  # "--output=~/out" reaches us unexpanded; Beam's file sinks do not expand it
        args.output = os.path.expanduser(args.output)
    if args.report:
        args.report = os.path.expanduser(args.report)
    return args, beam_args


def images_dir(output: str) -> str:
    """Where img2img's images go: `<output>/images`, made absolute when local, so the index's `output_uri`s name
    the files from any working directory."""
    directory = f"{output.rstrip('/')}/{IMAGES}"
    return os.path.abspath(os.path.expanduser(directory)) if is_local(directory) else directory


def job_task(args: argparse.Namespace) -> InferenceTask:
    """The task that --task and --model name, with --weights."""
    if args.task == "img2img":
        task = resolve_img2img_task(args.model, images_dir(args.output), args.image_size, IMAGE_FORMAT)
    elif args.task == "embed":
        task = text_embedder(args.model, args.text_field)
    else:
        task = resolve_task(args.model, args.top_k, args.decode)
    return with_weights(task, args.weights) if args.weights else task


def output_files(task: str, output: str) -> list[str]:
    """What a job of `task` writes under `output`, as globs (for the summary)."""
    names = [f"{IMAGES}/*.{IMAGE_FORMAT}"] if task == "img2img" else []
    names += [f"{ROWS[task]}-*.parquet", "dead_letters-*.parquet"]
    return [f"{output.rstrip('/')}/{name}" for name in names]


class _ScoreTop1(beam.DoFn):
    """Counts predictions whose top label matches a known label (the sample's ground truth)."""

    def process(self, row: dict) -> None:
        if row.get("label") is not None:
            Metrics.counter(METRICS_NAMESPACE, "labelled").inc()
            if row["top_labels"] and row["top_labels"][0] == row["label"]:
                Metrics.counter(METRICS_NAMESPACE, "top1_correct").inc()


@dataclass
class Summary:
    counters: dict[str, int]
    seconds: float

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def padding_ratio(self) -> float | None:
        """Padded tokens run per token of the records (variable-length inputs only)."""
        return self.get("padded_tokens") / self.get("tokens") if self.get("tokens") else None

    @property
    def mean_batch_size(self) -> float:
        return self.get("batched_records") / self.get("batches") if self.get("batches") else 0.0

    def fields(self, task: str, runner: str, model: str, config: EngineConfig, started: float) -> dict[str, Any]:
        """The summary as the report's table."""
        labelled = self.get("labelled")
        return {
            "task": task, "runner": runner, "started": report.started_at(started), "model": model,
            "device": config.device, "dtype": config.dtype, "batch_size": config.batch_size,
            "records": self.get("records"), "predictions": self.get("predictions"),
            "dead_letters": self.get("dead_letters"), "seconds": round(self.seconds, 3),
            "records_per_s": round(self.get("records") / self.seconds, 1) if self.seconds else None,
            "engines": self.get("engines"), "batches": self.get("batches"),
            "mean_batch_size": round(self.mean_batch_size, 1),
            "padding_ratio": round(self.padding_ratio, 3) if self.padding_ratio else None,
            "top1_accuracy": round(self.get("top1_correct") / labelled, 4) if labelled else None,
            **{f"busy_s_{stage}": round(self.get(f"busy_us_{stage}") / 1e6, 3) for stage in STAGES
               if self.get(f"busy_us_{stage}")},
        }

    def render(self, task: str, runner: str, model: str, config: EngineConfig, outputs: Sequence[str]) -> str:
        records = self.get("records")
        busy = ", ".join(f"{s} {self.get(f'busy_us_{s}') / 1e6:.2f}s" for s in STAGES)
        lines = [
            f"beam_infer {task} on {runner}: {records} records ({self.get('predictions')} predictions, "
            f"{self.get('dead_letters')} dead letters) in {self.seconds:.1f}s = {records / self.seconds:.1f} "
            "records/s end to end",
            f"model {model}, batch {config.batch_size}, device {config.device}, dtype {config.dtype}; "
            f"engines (model copies) built: {self.get('engines')}",
            f"busy time per stage (summed over threads; for remote reads and writes, over requests in flight): {busy}",
            f"batches: {self.get('batches')} (mean size {self.mean_batch_size:.1f})",
        ]
        if self.get("tokens"):
            lines.append(f"padding: {self.get('padded_tokens'):,} padded tokens for {self.get('tokens'):,} "
                         f"= {self.padding_ratio:.3f}x")
        io = {name: self.get(name) for name in ("fetch_retries", "fetch_failures", "put_retries", "put_failures")}
        if any(io.values()):
            lines.append("remote I/O: " + ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in io.items()))
        if self.get("labelled"):
            lines.append(f"top-1 accuracy: {self.get('top1_correct') / self.get('labelled'):.2%} over "
                         f"{self.get('labelled')} labelled records")
        lines.append(f"outputs: {', '.join(outputs)}")
        return "\n".join(lines)


def query_counters(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    """beam_infer's counters, summed over steps (committed where the runner has them, else attempted)."""
    counters: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (value or 0)
    return counters


def run_job(options: PipelineOptions, source: str, task: InferenceTask, config: EngineConfig,
            output: str, budget: Budget = Budget(), chunk_size: int = DEFAULT_CHUNK_SIZE,
            rows: str = ROWS["classify"]) -> Summary:
    """Runs the job over `source` and waits for it: the data flow, top to bottom. The task's rows go to
    `<output>/<rows>-*.parquet`; objects its postprocess returns as Blobs are written by the inference itself.

    Raises:
        FailureBudgetExceeded (inside the runner's error): more records failed than `budget` allows.
    """
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner=resolve_runner(options), options=options)
    columns = ("uri", task.inline_field) if task.inline_field else ("uri",)  # what names a record's input
    records = pipeline | "Read" >> ReadRecords(source, chunk_size, columns) | "Spread" >> beam.Reshuffle()
    results = records | "Infer" >> RunGpuInference(task, config)
    results.predictions | "WritePredictions" >> WritePredictions(output, task.output_schema, name=rows)
    results.dead_letters | "WriteDeadLetters" >> WriteDeadLetters(output)
    if "top_labels" in task.output_schema.names:  # a classifier
        results.predictions | "ScoreTop1" >> beam.ParDo(_ScoreTop1())
    if not budget.unlimited:
        (results.predictions, results.dead_letters) | "FailureBudget" >> FailureBudget(budget)
    result = pipeline.run()
    result.wait_until_finish()
    return Summary(query_counters(result), time.perf_counter() - start)


def checked_job(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], InferenceTask, EngineConfig]:
    """The parsed options, Beam's options (Dataflow's assembled), the task and the engine's config, once
    pipelines.validate and the Dataflow checks found no mistake in them.

    Raises:
        UsageError: the first mistake, in one line.
    """
    args, beam_args = parse_args(argv)
    check_job(args)
    try:
        config = EngineConfig(batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                              max_tokens=args.max_tokens or 0)
    except ValueError as e:
        raise UsageError(str(e)) from e
    beam_args = prepare_storage_emulator(beam_args)  # STORAGE_EMULATOR_HOST: no wait on Google credentials
    try:
        beam_args = dataflow_args(args, beam_args)
    except ValueError as e:  # flags that do not go together on Dataflow
        raise UsageError(str(e)) from e
    check_model_name(args.model)
    try:
        task = job_task(args)
    except ValueError as e:
        if is_user_factory(args.model):
            raise  # from the user's own module:function: its traceback is what they need
        raise UsageError(str(e)) from e  # "unknown --model ...", said by the resolvers
    return args, beam_args, task, config


def write_report(args: argparse.Namespace, summary: Summary, runner: str, model: str, config: EngineConfig,
                 telemetry_dir: str, start: float) -> None:
    """Writes --report from the summary and the engines' telemetry; a report that cannot be written is a warning:
    the job's outputs are already in place."""
    try:
        fields = summary.fields(args.task, runner, model, config, started=start)
        logs = monitor.read_logs(telemetry_dir)
        report.write(args.report, report.build(fields, logs, start, start + summary.seconds))
    except Exception as e:  # noqa: BLE001
        _LOG.warning("beam_infer: could not write the report %s: %r", args.report, e)


def main(argv: Sequence[str] | None = None, command: bool = False) -> Summary:
    """Runs the job that `argv` describes, showing its progress, and prints its summary (and writes its report).
    As the command (`command=True`), it also sets up logging (-v) and turns Ctrl-C and SIGTERM into a quick, clean
    stop (pipelines/interrupt.py); a program that calls main() (Airflow, a notebook, the tests) keeps its own
    logging and signal handling."""
    try:
        args, beam_args, task, config = checked_job(argv)
    except UsageError as e:
        print(f"beam_infer: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if command:
        configure_logging(args.verbose)
    options = PipelineOptions([f"--runner={args.runner}", *beam_args])
    runner = options.view_as(StandardOptions).runner
    log_dataflow_job_id(args.runner)
    sample_dir = telemetry_dir = None
    temp_before = interrupt.temp_dirs(args.output) if command else set()
    try:
        sample_dir = tempfile.mkdtemp(prefix="beam_infer_sample_") if args.input is None else None
        telemetry_dir = tempfile.mkdtemp(prefix="beam_infer_telemetry_")  # the engines' samples (local workers)
        config = dataclasses.replace(config, telemetry_dir=telemetry_dir)
        scratch = (sample_dir, telemetry_dir)
        with interrupt.stopping_on_signals() if command else contextlib.nullcontext([]) as signals:
            try:
                sample = write_text_sample if args.task == "embed" else write_sample
                source = args.input if args.input is not None else sample(sample_dir, args.sample_size)
                total = progress.input_total(args.input, args.sample_size)
                with progress.Progress(telemetry_dir, total, args.progress, args.progress_every) as shown:
                    summary = run_job(options, source, task, config, args.output,
                                      Budget(args.max_dead_letters, args.max_dead_letter_fraction),
                                      chunk_size=args.chunk_size, rows=ROWS[args.task])
                    shown.finish(summary.get("records"))
            except BaseException as e:
                if signals:  # Ctrl-C or SIGTERM, wherever Beam wrapped its KeyboardInterrupt: ends the process
                    interrupt.stop_after(signals[0], args.output, temp_before, e, scratch)
                if command and isinstance(e, Exception) and not args.verbose:
                    print(f"beam_infer: error: the job failed: {first_error(e)}\n(-v shows where)", file=sys.stderr)
                    raise SystemExit(1) from None
                raise
            if signals:  # one came as the job was ending: the process still ends by it
                interrupt.stop_after(signals[0], args.output, temp_before, KeyboardInterrupt(), scratch)
        if args.report:
            write_report(args, summary, runner, task.name, config, telemetry_dir, shown.start)
    finally:
        for folder in (sample_dir, telemetry_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
    outputs = output_files(args.task, args.output) + ([args.report] if args.report else [])
    print(summary.render(args.task, runner, task.name, config, outputs))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:], command=True)
