import dataclasses
import os
import pickle
import threading
from collections import Counter
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from beam_infer import EngineConfig, InProcessDirectRunner, RunGpuInference, shapes_classifier
from beam_infer import dofn as dofn_module
from beam_infer.dofn import DEAD_LETTERS, ENGINES, METRICS_NAMESPACE, _GpuInferenceDoFn
from beam_infer.engine.engine import _LIVE_ENGINES
from beam_infer.io.read import read_manifest
from beam_infer.models.shapes_net import INPUT_SIZE, load_shapes_net
from beam_infer.tasks.classify import decode_resize
from pipelines.run import query_counters
from tests.conftest import engine_threads, write_bad_files
from tests.fakes import marking_processes, number_task, process_marks, safe, twice, write_numbers

pytestmark = pytest.mark.timeout(180)
CPU = EngineConfig(device="cpu", batch_size=8)


def pipeline(*flags):
    # options=, not argv=: TestPipeline reads only --test-pipeline-options from argv and drops other flags.
    return TestPipeline(runner=InProcessDirectRunner(), options=PipelineOptions(list(flags)))


def run_bundles(dofn, elements, bundle_size):
    """Drives a DoFn's lifecycle by hand; returns, per bundle, (inputs, outputs emitted during that bundle)."""
    dofn.setup()
    bundles = []
    for start in range(0, len(elements), bundle_size):
        chunk = elements[start:start + bundle_size]
        dofn.start_bundle()
        out = []
        for e in chunk:
            out += list(dofn.process(e, window=window.GlobalWindow(), timestamp=Timestamp(0)))
        out += list(dofn.finish_bundle() or [])
        bundles.append((chunk, out))
    dofn.teardown()
    return bundles


@pytest.mark.parametrize("bundle_size", [1, 3, 8, 25, 1000])
def test_finish_bundle_drains_every_pending_element_of_its_bundle(bundle_size):
    records = write_numbers(safe(50))
    for inputs, outputs in run_bundles(_GpuInferenceDoFn(number_task(), CPU), records, bundle_size):
        assert all(isinstance(o, WindowedValue) for o in outputs)
        assert sorted(o.value["id"] for o in outputs) == sorted(r["id"] for r in inputs)


class _RecordedMetrics:
    """Stands in for Beam's Metrics in a DoFn driven by hand (no runner, so no metrics context): sums counters."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def counter(self, namespace, name):
        return SimpleNamespace(inc=lambda n=1: self.counters.update({name: n}))

    def distribution(self, namespace, name):
        return SimpleNamespace(update=lambda value: None)


def test_the_dofn_that_built_the_engine_counts_it_once_however_many_bundles_it_runs(monkeypatch):
    metrics = _RecordedMetrics()
    monkeypatch.setattr(dofn_module, "Metrics", metrics)
    bundles = run_bundles(_GpuInferenceDoFn(number_task(name="counted"), CPU), write_numbers(safe(20)), 3)
    assert len(bundles) == 7 and metrics.counters["records"] == 20
    assert metrics.counters[ENGINES] == 1


def test_several_dofn_threads_feed_one_engine_and_each_bundle_gets_its_own_results():
    template = _GpuInferenceDoFn(number_task(name="threads"), EngineConfig(device="cpu", batch_size=16))
    records = write_numbers(safe(240))
    shards = [records[i::4] for i in range(4)]
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = run_bundles(pickle.loads(pickle.dumps(template)), shards[i], 7)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    _LIVE_ENGINES.clear()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    engines = [e for e in _LIVE_ENGINES if e.task.name == "threads"]
    assert len(engines) == 1  # one engine for the process, shared through Shared
    for bundles in results.values():
        for inputs, outputs in bundles:
            assert sorted(o.value["id"] for o in outputs) == sorted(r["id"] for r in inputs)
    assert sum(len(o) for b in results.values() for _, o in b) == 240
    assert engine_threads() == []


@pytest.mark.parametrize("bundle_size", [1, 2, 100])
def test_a_chunk_of_records_is_split_into_records_and_each_comes_out_once_in_its_bundle(bundle_size):
    records = write_numbers(safe(30))
    chunks = [records[i:i + 7] for i in range(0, len(records), 7)]  # 7 does not divide 30: a short last chunk
    for inputs, outputs in run_bundles(_GpuInferenceDoFn(number_task(), CPU), chunks, bundle_size):
        assert all(isinstance(o, WindowedValue) and isinstance(o.value, dict) for o in outputs)
        assert sorted(o.value["id"] for o in outputs) == sorted(r["id"] for chunk in inputs for r in chunk)


def test_a_bad_record_inside_a_chunk_is_a_dead_letter_and_its_neighbours_go_on():
    records = write_numbers(safe(6))
    chunk = [*records[:3], {"id": "no-uri"}, *records[3:]]
    with pipeline() as p:
        out = p | beam.Create([chunk, []]) | RunGpuInference(number_task(), CPU)
        assert_that(_ids(out.predictions), equal_to([r["id"] for r in records]))
        assert_that(out[DEAD_LETTERS] | beam.Map(lambda d: (d["id"], d["stage"])), equal_to([("no-uri", "input")]),
                    label="DeadLetters")


def test_records_of_a_chunk_keep_the_chunks_window_and_timestamp():
    records = write_numbers(safe(8))
    with pipeline() as p:
        chunks = (p | beam.Create([(records[:5], 10), (records[5:], 45)])
                  | beam.Map(lambda c: window.TimestampedValue(c[0], c[1])) | beam.WindowInto(window.FixedWindows(20)))
        out = chunks | RunGpuInference(number_task(), CPU)
        expected = [(r["id"], (0, 20_000_000), 10_000_000) for r in records[:5]]
        expected += [(r["id"], (40_000_000, 60_000_000), 45_000_000) for r in records[5:]]
        assert_that(out.predictions | beam.ParDo(_WindowAndTime()), equal_to(expected))


def _ids(pcoll):
    return pcoll | beam.Map(lambda row: row["id"])


@pytest.mark.parametrize("flags", [
    [],
    ["--direct_running_mode=multi_threading", "--direct_num_workers=3"],
])
def test_no_record_lost_or_duplicated_through_a_pipeline(sample_dir, flags):
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    with pipeline(*flags) as p:
        out = p | beam.Create(records) | beam.Reshuffle() | RunGpuInference(shapes_classifier(), CPU)
        assert_that(_ids(out.predictions), equal_to([r["id"] for r in records]))
        assert_that(out.dead_letters, equal_to([]), label="NoDeadLetters")


def run_counting_engines(sample_dir, marks_dir, *flags) -> dict[str, int]:
    """Runs the shapes task over the sample with `flags`, its processes marking `marks_dir`; returns counters."""
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    task = marking_processes(shapes_classifier(), str(marks_dir))
    p = pipeline(*flags)
    out = p | beam.Create(records) | beam.Reshuffle() | RunGpuInference(task, CPU)
    assert_that(_ids(out.predictions), equal_to([r["id"] for r in records]))
    result = p.run()
    result.wait_until_finish()
    return query_counters(result)


def test_dofn_threads_of_one_process_build_one_engine_and_count_it_once(sample_dir, tmp_path):
    counters = run_counting_engines(sample_dir, tmp_path, "--direct_running_mode=multi_threading",
                                    "--direct_num_workers=4")
    loads, processed_in = process_marks(str(tmp_path))
    assert loads == {os.getpid(): 1} and processed_in == {os.getpid()}
    assert counters[ENGINES] == 1


def test_multi_processing_builds_one_engine_per_worker_process_that_processed_records(sample_dir, tmp_path):
    counters = run_counting_engines(sample_dir, tmp_path, "--direct_running_mode=multi_processing",
                                    "--direct_num_workers=2")
    loads, processed_in = process_marks(str(tmp_path))
    assert os.getpid() not in processed_in  # the DoFn pickled and ran in worker processes
    assert 1 <= len(processed_in) <= 2 and set(loads) == processed_in
    assert set(loads.values()) == {1}  # never two model copies in one process
    assert counters[ENGINES] == len(processed_in)


def test_predictions_equal_a_plain_torch_loop(sample_dir):
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    model = load_shapes_net()
    expected = {}
    with torch.inference_mode():
        for r in records:
            with open(r["uri"], "rb") as f:
                x = torch.from_numpy(decode_resize(f.read(), INPUT_SIZE).copy())[None]
            probs = model(x).softmax(-1)[0]
            scores, idx = probs.topk(3)
            expected[r["id"]] = (idx.tolist(), scores.numpy())

    from beam_infer.sample import SHAPE_CLASSES

    def check(rows):
        assert len(rows) == len(expected)
        for row in rows:
            idx, scores = expected[row["id"]]
            assert row["top_labels"] == [SHAPE_CLASSES[i] for i in idx]
            np.testing.assert_allclose(row["top_scores"], scores, rtol=1e-4, atol=1e-5)

    with pipeline() as p:
        out = p | beam.Create(records) | RunGpuInference(shapes_classifier(), CPU)
        assert_that(out.predictions, check)


class _WindowAndTime(beam.DoFn):
    def process(self, row, w=beam.DoFn.WindowParam, ts=beam.DoFn.TimestampParam):
        yield row["id"], (w.start.micros, w.end.micros), ts.micros


def test_outputs_keep_their_inputs_window_and_timestamp():
    records = write_numbers(safe(12))
    with pipeline() as p:
        stamped = (p | beam.Create(records)
                   | beam.Map(lambda r: window.TimestampedValue(r, int(r["id"][1:]) * 5))
                   | beam.WindowInto(window.FixedWindows(20)))
        out = stamped | RunGpuInference(number_task(), CPU)
        expected = [(f"n{i}", ((i * 5 // 20) * 20_000_000, (i * 5 // 20 + 1) * 20_000_000), i * 5_000_000)
                    for i in range(12)]
        assert_that(out.predictions | beam.ParDo(_WindowAndTime()), equal_to(expected))


def test_corrupt_and_zero_byte_files_go_to_dead_letters_and_the_job_completes(sample_dir):
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    corrupt, empty = write_bad_files(sample_dir)
    bad = [{"id": "corrupt", "uri": corrupt}, {"id": "empty", "uri": empty}]
    with pipeline() as p:
        out = p | beam.Create(records + bad) | beam.Reshuffle() | RunGpuInference(shapes_classifier(), CPU)
        assert_that(_ids(out.predictions), equal_to([r["id"] for r in records]))
        assert_that(out.dead_letters | beam.Map(lambda d: (d["id"], d["uri"], d["stage"], d["error_type"])),
                    equal_to([("corrupt", corrupt, "preprocess", "OSError"),
                              ("empty", empty, "preprocess", "ValueError")]), label="DeadLetters")


def test_a_record_without_uri_is_a_dead_letter_not_a_crash():
    with pipeline() as p:
        out = p | beam.Create([{"id": "x"}, "just a string"]) | RunGpuInference(number_task(), CPU)
        assert_that(out[DEAD_LETTERS] | beam.Map(lambda d: (d["id"], d["stage"])),
                    equal_to([("x", "input"), ("'just a string'", "input")]))


def test_metrics_count_records_batches_and_busy_time_of_every_stage_that_ran():
    records = write_numbers(safe(40))
    p = pipeline("--direct_running_mode=multi_threading", "--direct_num_workers=2")
    p | beam.Create(records) | beam.Reshuffle() | RunGpuInference(number_task(name="metrics"), CPU)
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    counters = {c.key.metric.name: c.committed for c in metrics["counters"]}
    (sizes,) = [d.committed for d in metrics["distributions"] if d.key.metric.name == "batch_size"]
    assert counters["records"] == counters["predictions"] == 40
    assert sizes.sum == 40 and sizes.max <= CPU.batch_size and sizes.count >= 40 // CPU.batch_size
    assert counters["batches"] == sizes.count and counters["batched_records"] == 40  # what summaries read
    for stage in ("fetch", "preprocess", "collate", "forward", "postprocess"):
        assert counters.get(f"busy_us_{stage}", 0) > 0, stage


def test_no_engine_thread_is_left_running_after_the_pipeline_ends(sample_dir):
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    with pipeline() as p:
        p | beam.Create(records) | RunGpuInference(shapes_classifier(), CPU)
    assert engine_threads() == []


@pytest.fixture(autouse=True)
def _quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def test_a_postprocess_returning_none_is_a_dead_letter_and_the_job_completes():
    task = dataclasses.replace(number_task(name="returns_none"),
                               postprocess=lambda outs, r: None if r["id"] == "n2" else twice(outs, r))
    records = write_numbers(safe(6))
    with pipeline() as p:
        out = p | beam.Create(records) | RunGpuInference(task, CPU)
        assert_that(_ids(out.predictions), equal_to([r["id"] for r in records if r["id"] != "n2"]))
        assert_that(out.dead_letters | beam.Map(lambda d: (d["id"], d["stage"], d["error_type"])),
                    equal_to([("n2", "postprocess", "TypeError")]), label="DeadLetters")


def test_a_device_fault_fails_the_job_with_a_clear_error_and_ends_the_worker_process(process_exits):
    from beam_infer.engine import EngineFatalError
    from beam_infer.engine.errors import FATAL_EXIT_CODE

    def postprocess(outputs, record):  # a postprocess that touches the (broken) device
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    task = dataclasses.replace(number_task(name="device_fault"), postprocess=postprocess)
    with pytest.raises(Exception, match="device fault in postprocess") as raised:
        with pipeline() as p:
            p | beam.Create(write_numbers(safe(8))) | RunGpuInference(task, CPU)
    assert EngineFatalError.__name__ in str(raised.value) or isinstance(raised.value, EngineFatalError)
    assert process_exits.called.wait(20) and process_exits.codes == [FATAL_EXIT_CODE]


def test_a_bundle_abandoned_after_a_failure_downstream_is_forgotten_when_the_next_bundle_starts():
    dofn = _GpuInferenceDoFn(number_task(name="abandoned"), CPU)
    first, second = write_numbers(safe(2))
    dofn.setup()
    dofn.start_bundle()
    list(dofn.process(first, window=window.GlobalWindow(), timestamp=Timestamp(0)))
    health = dofn._engine._run.health  # the runner drops that bundle: no finish_bundle
    dofn.start_bundle()
    list(dofn.process(second, window=window.GlobalWindow(), timestamp=Timestamp(0)))
    list(dofn.finish_bundle())
    assert health.wait_for_no_open_bundle(0)  # else a device fault's exit would wait its whole grace for it
    dofn.teardown()


def test_teardown_forgets_the_bundle_of_a_failed_instance_that_the_harness_discards():
    dofn = _GpuInferenceDoFn(number_task(name="discarded"), CPU)
    dofn.setup()
    dofn.start_bundle()
    list(dofn.process(write_numbers(safe(1))[0], window=window.GlobalWindow(), timestamp=Timestamp(0)))
    health = dofn._engine._run.health
    dofn.teardown()  # finish_bundle never ran: the bundle failed downstream
    assert health.wait_for_no_open_bundle(0)
