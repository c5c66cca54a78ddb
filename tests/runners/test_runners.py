"""The classify job on every runner it supports gives the rows it gives on the in-process DirectRunner.

Flink and Spark need Java and a job-server jar (see job_servers.py): without them their tests skip, or fail
where BEAM_INFER_REQUIRE_JVM=1 (CI).
"""

import numpy as np
import pytest

from beam_infer.sample import write_sample
from pipelines import run
from tests.conftest import skip_or_fail_jvm_test
from tests.pipelines.test_run import read_rows
from tests.runners.job_servers import FLINK, SPARK, JobServer, Unavailable, java_missing, job_server_flags

pytestmark = pytest.mark.timeout(300)
JVM_TIMEOUT_S = 900  # a job-server JVM and an embedded Flink or Spark start slowly on a loaded 2-core machine
SAMPLE_SIZE = 24
SCORE_TOLERANCE = 1e-4  # batches differ between runners (bundles differ), so float sums differ in the last bits


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return write_sample(str(tmp_path_factory.mktemp("sample")), SAMPLE_SIZE, seed=4242)


def run_classify(manifest: str, output: str, flags: list[str]) -> tuple[run.Summary, dict[str, dict]]:
    """Runs `python -m pipelines.run` in this process; returns its summary and its prediction rows by id."""
    summary = run.main(["--input", manifest, "--output", output, "--batch-size", "8", *flags])
    assert read_rows(output, "dead_letters") == []
    return summary, {row["id"]: row for row in read_rows(output, "predictions")}


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> dict[str, dict]:
    """The in-process DirectRunner's rows, which every other runner must reproduce."""
    summary, rows = run_classify(manifest, str(tmp_path_factory.mktemp("reference")), [])
    assert len(rows) == SAMPLE_SIZE and summary.get("engines") == 1
    assert sum(row["top_labels"][0] == row["label"] for row in rows.values()) >= SAMPLE_SIZE - 1
    return rows


def assert_same_rows(rows: dict[str, dict], reference: dict[str, dict]) -> None:
    assert rows.keys() == reference.keys()
    for rid, row in rows.items():
        expected = reference[rid]
        assert (row["uri"], row["label"], row["top_labels"][0]) == (
            expected["uri"], expected["label"], expected["top_labels"][0]), rid
        np.testing.assert_allclose(row["top_scores"], expected["top_scores"], atol=SCORE_TOLERANCE, err_msg=rid)


@pytest.mark.parametrize(("flags", "max_engines"), [
    pytest.param(["--direct_running_mode=multi_threading", "--direct_num_workers=4"], 1, id="direct-4-threads"),
    pytest.param(["--direct_running_mode=multi_processing", "--direct_num_workers=2"], 2, id="direct-2-processes"),
    pytest.param(["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"], 1,
                 id="portable-embed-loopback"),
    pytest.param(["--runner=PortableRunner", "--job_endpoint=embed"], 1, id="portable-embed-defaults-to-loopback"),
])
def test_classify_on_direct_and_portable_runners_gives_the_in_process_rows(manifest, reference, tmp_path, flags,
                                                                           max_engines):
    summary, rows = run_classify(manifest, str(tmp_path), flags)
    assert_same_rows(rows, reference)
    assert (summary.get("records"), summary.get("predictions")) == (SAMPLE_SIZE, SAMPLE_SIZE)
    assert 1 <= summary.get("engines") <= max_engines


def jvm_runner_flags(server: JobServer) -> list[str]:
    """`server`'s local flags plus its job-server jar; skips (or, in CI, fails) without Java or a jar."""
    reason = java_missing()
    if reason is None:
        try:
            return [*server.flags, *job_server_flags(server)]
        except Unavailable as e:
            reason = str(e)
    skip_or_fail_jvm_test(f"{server.runner} cannot run here: {reason}")


@pytest.mark.parametrize("server", [pytest.param(FLINK, marks=pytest.mark.flink, id="flink-local"),
                                    pytest.param(SPARK, marks=pytest.mark.spark, id="spark-local")])
@pytest.mark.timeout(JVM_TIMEOUT_S)
def test_classify_on_local_flink_and_spark_gives_the_in_process_rows(manifest, reference, tmp_path, server):
    summary, rows = run_classify(manifest, str(tmp_path), jvm_runner_flags(server))
    assert_same_rows(rows, reference)
    assert (summary.get("records"), summary.get("engines")) == (SAMPLE_SIZE, 1)  # LOOPBACK: the SDK worker is here
