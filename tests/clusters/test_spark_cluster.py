"""The job on a Spark 3.5 standalone cluster (master + worker JVMs, 2 cores) with Beam's worker pool as the
EXTERNAL environment: the engine runs in SDK worker processes the pool starts, not in the launcher.

Every test submits as a user would (`--runner=SparkRunner --spark_master_url=spark://...`): Beam starts a job
server, whose Spark driver is the cluster's application for that job. On Spark the portable runner asks the
worker pool for a fresh SDK worker for every stage, so a job of ~16 stages takes 40-75 s here. One cluster serves
the whole module (started once, stopped and reaped at the end even when a test fails). Without Java, pyspark or
a job-server jar the tests skip; with BEAM_INFER_REQUIRE_JVM=1 they fail.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time

import pytest

from pipelines import run
from tests.clusters import tasks
from tests.clusters.common import WorkerPool
from tests.clusters.spark import MAX_TASK_FAILURES, SparkCluster, Unavailable
from tests.conftest import skip_or_fail_jvm_test
from tests.fakes import process_marks
from tests.pipelines.test_run import read_rows
from tests.runners import job_servers
from tests.runners.test_runners import SAMPLE_SIZE, assert_same_rows, manifest, reference  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.spark_cluster, pytest.mark.timeout(300)]
KILL_RECORDS = 2000
JOB_TIMEOUT_S = 240  # a job must end by then (it shares the 2 cores with the other test worker): a hang fails the
# test with the cluster's logs instead of pytest's timeout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = job_servers.java_missing()
    if reason is None:
        try:
            job_servers.job_server_flags(job_servers.SPARK)
        except job_servers.Unavailable as e:
            reason = str(e)
    if reason is not None:
        skip_or_fail_jvm_test(f"no Spark cluster here: {reason}")
    spark = SparkCluster(str(tmp_path_factory.mktemp("spark")))
    try:
        spark.start()
    except Unavailable as e:
        spark.stop()
        skip_or_fail_jvm_test(f"no Spark cluster here: {e}")
    try:
        yield spark
    finally:
        spark.stop()
    assert not [p for p in spark.processes.procs.values() if p.poll() is None], "a cluster process outlived stop()"


@pytest.fixture
def marks(cluster, tmp_path, monkeypatch) -> str:
    """A folder for the task's process marks; the job server's driver settings in the environment."""
    for name, value in cluster.driver_env().items():
        monkeypatch.setenv(name, value)
    directory = tmp_path / "marks"
    directory.mkdir()
    monkeypatch.setenv(tasks.MARKS_ENV, str(directory))
    return str(directory)


def new_app(cluster: SparkCluster, before: list[str]) -> str:
    (app,) = set(cluster.apps()) - set(before)
    return app


def attempts_of(cluster: SparkCluster, app: str) -> list[dict]:
    return [a for a in cluster.task_attempts() if a["app"] == app]


@dataclasses.dataclass
class Failed:
    """How a job that had to fail ended: its error, its seconds, and when (if ever) the watchdog killed it."""

    error: str
    seconds: float
    killed_after_s: float | None


def run_failing(cluster: SparkCluster, argv: list[str]) -> Failed:
    """Runs a job that must fail (in this thread: Beam's job server wants the main thread), with a watchdog that
    kills its Spark application after JOB_TIMEOUT_S, so that a hang fails the test with the logs."""
    start = time.monotonic()
    done = threading.Event()
    killed: list[float] = []

    def watchdog():
        if not done.wait(JOB_TIMEOUT_S):
            killed.append(time.monotonic() - start)  # before the kill: the job may fail as soon as it is killed
            for app in cluster.active_apps():
                cluster.kill_app(app)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        summary = run.main(argv)
    except Exception as e:
        return Failed(f"{type(e).__name__}: {e}", time.monotonic() - start, killed[0] if killed else None)
    finally:
        done.set()
        thread.join()
    raise AssertionError(f"the job was meant to fail, but passed: {summary.counters}")


def test_classify_on_the_cluster_runs_the_engine_in_sdk_workers_and_gives_the_in_process_rows(
        cluster, manifest, reference, marks, tmp_path):  # noqa: F811 (fixtures)
    before = cluster.apps()
    output = str(tmp_path / "out")
    summary = run.main(["--input", manifest, "--output", output, "--batch-size", "4", "--chunk-size", "4",
                        "--model", "tests.clusters.tasks:marked_classify", *cluster.job_flags()])
    assert read_rows(output, "dead_letters") == []
    assert_same_rows({row["id"]: row for row in read_rows(output, "predictions")}, reference)
    assert summary.get("records") == SAMPLE_SIZE
    loads, processed_in = process_marks(marks)
    assert processed_in and os.getpid() not in processed_in  # the engine ran in the pool's SDK workers
    assert set(loads) == processed_in and set(loads.values()) == {1}  # one model copy per worker process
    assert summary.get("engines") == len(processed_in)
    # Both cores worked: two tasks of one stage ran at the same time on the worker's 2 cores.
    attempts = attempts_of(cluster, new_app(cluster, before))
    assert all(a["reason"] == "Success" for a in attempts), attempts
    by_stage = collections.defaultdict(list)
    for a in attempts:
        by_stage[a["stage"]].append(a)
    assert any(x["index"] != y["index"] and x["launch"] < y["finish"] and y["launch"] < x["finish"]
               for stage in by_stage.values() for x in stage for y in stage), attempts
    print(f"\nspark classify: {SAMPLE_SIZE} records, engines {summary.get('engines')} in SDK workers "
          f"{sorted(processed_in)} (launcher {os.getpid()}), {len(attempts)} task attempts, all first attempts")


def test_a_killed_sdk_worker_is_rerun_by_spark_task_retry_and_every_record_is_written_once(
        cluster, marks, tmp_path):
    inputs = tasks.write_numbers(str(tmp_path / "in"), KILL_RECORDS)
    output = str(tmp_path / "out")
    before = cluster.apps()
    killed: list[int] = []
    done = threading.Event()

    def kill_one_that_runs_bundles():
        while not done.is_set():
            _, processed_in = process_marks(marks)
            if processed_in:  # an SDK worker wrote rows: its engine is mid-job
                killed.append(cluster.pool.kill_sdk_worker(min(processed_in)))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_that_runs_bundles, daemon=True)
    killer.start()
    try:
        summary = run.main(["--input", inputs, "--output", output, "--batch-size", "8", "--chunk-size", "50",
                            "--model", "tests.clusters.tasks:numbers", *cluster.job_flags()])
    finally:
        done.set()
        killer.join()
    assert killed, "no SDK worker ran bundles, so none was killed"
    _, processed_in = process_marks(marks)
    assert killed[0] in processed_in and len(processed_in) >= 2  # the retry ran in a fresh SDK worker
    ids = [row["id"] for row in read_rows(output, "predictions") + read_rows(output, "dead_letters")]
    counts = collections.Counter(ids)
    assert set(counts) == {f"n{i}" for i in range(KILL_RECORDS)}  # no record lost
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1][:10]  # none written twice
    attempts = attempts_of(cluster, new_app(cluster, before))
    failed = [a for a in attempts if a["reason"] != "Success"]
    retried = [a for a in attempts if a["attempt"] > 0]
    assert failed and retried, attempts  # the kill failed tasks, and Spark ran them again
    assert all(a["reason"] == "Success" for a in retried)
    print(f"\nspark killed worker: {KILL_RECORDS} records, SDK worker {killed[0]} SIGKILLed, {len(failed)} task "
          f"attempts failed ({failed[0]['reason'][:100]}), {len(retried)} retries (stage/task/attempt "
          f"{[(a['stage'], a['index'], a['attempt']) for a in retried]}), {len(counts)} distinct ids in "
          f"{len(ids)} rows ({summary.get('predictions')} predictions, {summary.get('dead_letters')} dead letters)")


def test_a_job_whose_sdk_workers_keep_dying_fails_with_spark_task_failures_not_a_hang(cluster, marks, tmp_path):
    inputs = tasks.write_numbers(str(tmp_path / "in"), 20)
    before = cluster.apps()
    failed = run_failing(cluster, ["--input", inputs, "--output", str(tmp_path / "out"),
                                   "--model", "tests.clusters.spark_tasks:dying_in_forward", *cluster.job_flags()])
    assert failed.killed_after_s is None, f"the job hung: killed after {JOB_TIMEOUT_S}s\n{cluster.executor_log()}"
    assert f"failed {MAX_TASK_FAILURES} times" in failed.error, failed.error[-3000:]
    attempts = attempts_of(cluster, new_app(cluster, before))
    assert max(a["attempt"] for a in attempts) == MAX_TASK_FAILURES - 1, attempts
    print(f"\nspark dying workers: failed in {failed.seconds:.0f}s after {MAX_TASK_FAILURES} attempts: "
          f"{failed.error[:300]}")


def test_a_worker_pool_without_beam_infer_fails_the_job_in_bounded_time_naming_the_module(cluster, marks, tmp_path):
    """beam_infer's worker pool answers StartWorker with the import error, and the job fails with it. (Beam's
    stock pool would start a worker that cannot unpickle the DoFn; the executor then waits 3 minutes per attempt
    for its data channel, hard-coded in GrpcDataService.createOutboundAggregator, and fails with "No client
    connected within timeout", not naming the module.)"""
    pool = WorkerPool(cluster.processes, cluster.work_dir, name="pool-without-beam-infer", without_beam_infer=True)
    pool.wait_ready()
    inputs = tasks.write_numbers(str(tmp_path / "in"), 20)
    failed = run_failing(cluster, ["--input", inputs, "--output", str(tmp_path / "out"),
                                   "--model", "tests.clusters.tasks:numbers", *cluster.job_flags(pool)])
    assert failed.killed_after_s is None, f"the job hung: killed after {JOB_TIMEOUT_S}s\n{pool.log_tail()}"
    assert "No module named 'beam_infer'" in failed.error, failed.error[-3000:]
    print(f"\nspark pool without beam_infer: failed after {failed.seconds:.0f}s: {failed.error[:300]}")
