"""RunGpuInference: the engine inside Beam. Only lifecycle glue lives here; the work is in beam_infer/engine.

Records (small dicts with a "uri" and optionally an "id") go in, one per element or in lists (chunks, from
ReadRecords(chunk_size=…)); predictions come out one per record on the main output and failed records, as
dead-letter rows, on the "dead_letters" output. Each output keeps its input element's window and timestamp, and
leaves in the bundle its input came in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_infer.config import EngineConfig
from beam_infer.engine.engine import Engine, Result
from beam_infer.task import InferenceTask, record_id

DEAD_LETTERS = "dead_letters"
PREDICTIONS = "predictions"
ENGINES = "engines"  # counter: engines built, one per worker process per (task, config)
METRICS_NAMESPACE = "beam_infer"


def dead_letter_row(record: Any, stage: str, error_type: str, message: str) -> dict[str, str]:
    """The dead-letter row of a record: id, uri, stage, error type and message."""
    fields = record if isinstance(record, Mapping) else {}
    return {"id": record_id(fields) if fields else repr(record)[:200], "uri": str(fields.get("uri", "")),
            "stage": stage, "error_type": error_type, "message": message}


class _GpuInferenceDoFn(beam.DoFn):
    def __init__(self, task: InferenceTask, config: EngineConfig) -> None:
        self._task = task
        self._config = config
        self._shared = Shared()  # one engine per worker process, whatever the number of DoFn instances
        self._inline_field = task.inline_field  # a record carries its input in this field, or names it by "uri"
        self._needs = "a record must be a mapping with a 'uri'" + (
            f" or a {task.inline_field!r} field" if task.inline_field else "")

    def setup(self) -> None:
        # Built by the first DoFn instance of the process; this reference keeps it alive while the DoFn lives.
        built = []

        def build() -> Engine:
            built.append(True)
            return Engine(self._task, self._config)

        self._engine = self._shared.acquire(build, tag=(self._task.name, self._config)).retain()
        # Metrics need a bundle: the instance that built the engine counts it at the end of its first bundle.
        self._engines_built = len(built)

    def start_bundle(self) -> None:
        self._forget_abandoned_bundle()
        self._bundle = self._engine.open_bundle()
        self._counts: Counter[str] = Counter()

    def process(self, element: Any, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator[Any]:
        context = (window, timestamp)
        for record in element if isinstance(element, list) else (element,):
            self._counts["records"] += 1
            if not isinstance(record, Mapping) or not (record.get("uri") or self._inline_field in record):
                self._counts[DEAD_LETTERS] += 1
                yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(
                    dead_letter_row(record, "input", "ValueError", self._needs), timestamp, [window]))
                continue
            self._bundle.submit(record, context)
        yield from self._emit(self._bundle.poll())

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit(self._bundle.drain())
        self._bundle = None
        if self._engines_built:
            self._counts[ENGINES] += self._engines_built
            self._engines_built = 0
        for name, n in self._counts.items():
            Metrics.counter(METRICS_NAMESPACE, name).inc(n)
        busy, batch_sizes, counts = self._engine.take_stats()  # the engine's, since any bundle last took them
        for name, n in counts.items():  # remote I/O's retries and failures
            Metrics.counter(METRICS_NAMESPACE, name).inc(n)
        for stage, seconds in busy.items():
            Metrics.counter(METRICS_NAMESPACE, f"busy_us_{stage}").inc(int(seconds * 1e6))
        sizes = Metrics.distribution(METRICS_NAMESPACE, "batch_size")
        for size in batch_sizes:
            sizes.update(size)
        if batch_sizes:  # as counters too, which every runner's summary reads: batches, and the rows in them
            Metrics.counter(METRICS_NAMESPACE, "batches").inc(len(batch_sizes))
            Metrics.counter(METRICS_NAMESPACE, "batched_records").inc(sum(batch_sizes))

    def teardown(self) -> None:
        self._forget_abandoned_bundle()  # a bundle that failed: the harness discards this instance
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.release()
            self._engine = None

    def _forget_abandoned_bundle(self) -> None:
        """A bundle whose finish_bundle never ran (it failed, or a transform downstream did) stops counting as
        open, so that nothing waits for it."""
        if getattr(self, "_bundle", None) is not None:
            self._bundle.close()
            self._bundle = None

    def _emit(self, results: Iterator[Result] | list[Result]) -> Iterator[Any]:
        for r in results:
            window, timestamp = r.context
            if r.failure is not None:
                self._counts[DEAD_LETTERS] += 1
                f = r.failure
                yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(
                    dead_letter_row(r.record, f.stage, f.error_type, f.message), timestamp, [window]))
            else:
                self._counts[PREDICTIONS] += 1
                row = {**r.record, "id": record_id(r.record), "model": self._task.name, **r.value}
                yield WindowedValue(row, timestamp, [window])


class RunGpuInference(beam.PTransform):
    """Runs `task` over records ({"uri", "id"?, …}), or lists of records, in one engine per worker process.

    Returns:
        A tuple of PCollections: `.predictions` (the record's fields, "id", "model" and the postprocess's
        fields) and `.dead_letters` (id, uri, stage, error_type, message).

    Example:
        results = records | RunGpuInference(shapes_classifier(), EngineConfig(batch_size=128))
        results.predictions | WritePredictions(out, task.output_schema)
        results.dead_letters | WriteDeadLetters(out)
    """

    def __init__(self, task: InferenceTask, config: EngineConfig | None = None) -> None:
        super().__init__()
        self._task = task
        self._config = config or EngineConfig()

    def expand(self, records: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return records | "Infer" >> beam.ParDo(_GpuInferenceDoFn(self._task, self._config)).with_outputs(
            DEAD_LETTERS, main=PREDICTIONS)
