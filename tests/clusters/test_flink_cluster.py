"""The job on a Flink 1.19 session cluster (JobManager + TaskManager JVMs, 2 slots) with Beam's worker pool as
the EXTERNAL environment: the engine runs in SDK worker processes the pool starts, not in the launcher.

The classify test submits as a user would (`--runner=FlinkRunner --flink_master=...`, which starts a job server
per job); the others share one job server (`--runner=PortableRunner --job_endpoint=...`) to save its start-up.
One cluster serves the whole module (started once, stopped and reaped at the end even when a test fails). Without
Java, apache-flink-libraries or a job-server jar the tests skip; with BEAM_INFER_REQUIRE_JVM=1 they fail.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pipelines import run
from tests.clusters import tasks
from tests.clusters.common import WorkerPool
from tests.clusters.flink import FLINK_1_19, RESTART_ATTEMPTS, FlinkCluster, Unavailable
from tests.conftest import skip_or_fail_jvm_test
from tests.fakes import process_marks
from tests.pipelines.test_run import read_rows
from tests.runners import job_servers
from tests.runners.test_runners import SAMPLE_SIZE, assert_same_rows, manifest, reference  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.flink_cluster, pytest.mark.timeout(300)]
KILL_RECORDS = 2000
JOB_TIMEOUT_S = 240  # a job must end by then (it shares the 2 cores with the other test worker): a hang fails the
# test with the cluster's logs instead of pytest's timeout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = job_servers.java_missing()
    if reason is None:
        try:
            job_servers.job_server_flags(FLINK_1_19)
        except job_servers.Unavailable as e:
            reason = str(e)
    if reason is not None:
        skip_or_fail_jvm_test(f"no Flink cluster here: {reason}")
    flink = FlinkCluster(str(tmp_path_factory.mktemp("flink")))
    try:
        flink.start()
    except Unavailable as e:
        flink.stop()
        skip_or_fail_jvm_test(f"no Flink cluster here: {e}")
    try:
        yield flink
    finally:
        flink.stop()
    assert not [p for p in flink.processes.procs.values() if p.poll() is None], "a cluster process outlived stop()"


@pytest.fixture
def marks(tmp_path, monkeypatch) -> str:
    directory = tmp_path / "marks"
    directory.mkdir()
    monkeypatch.setenv(tasks.MARKS_ENV, str(directory))
    return str(directory)


def run_bounded(argv: list[str], cluster: FlinkCluster, timeout_s: float = JOB_TIMEOUT_S) -> run.Summary:
    """run.main(argv) (in this thread: Beam's job server wants the main thread); a watchdog cancels the cluster's
    running jobs after `timeout_s`, and then the test fails as a hang rather than as the job's error."""
    hung = threading.Event()

    def cancel_running_jobs():
        hung.set()
        for job in cluster.jobs():
            if job["state"] not in ("FINISHED", "FAILED", "CANCELED"):
                cluster.rest_patch(f"/jobs/{job['jid']}?mode=cancel")

    watchdog = threading.Timer(timeout_s, cancel_running_jobs)
    watchdog.start()
    try:
        return run.main(argv)
    finally:
        watchdog.cancel()
        if hung.is_set():
            pytest.fail(f"the job did not end within {timeout_s:.0f}s (a hang): cancelled it\n"
                        f"{cluster.pool.log_tail()}")


def subtask_records(cluster: FlinkCluster, job_id: str, vertex_name: str) -> list[int]:
    """Records each subtask of the job's vertex whose name contains `vertex_name` read."""
    for vertex in cluster.rest(f"/jobs/{job_id}")["vertices"]:
        if vertex_name in vertex["name"]:
            detail = cluster.rest(f"/jobs/{job_id}/vertices/{vertex['id']}")
            return [s["metrics"]["read-records"] for s in detail["subtasks"]]
    raise AssertionError(f"no vertex named like {vertex_name!r} in job {job_id}")


def test_classify_on_the_cluster_runs_the_engine_in_sdk_workers_and_gives_the_in_process_rows(
        cluster, manifest, reference, marks, tmp_path):  # noqa: F811 (fixtures)
    summary = run_bounded(["--input", manifest, "--output", str(tmp_path / "out"), "--batch-size", "8",
                           "--chunk-size", "2", "--model", "tests.clusters.tasks:marked_classify",
                           *cluster.job_flags()], cluster)
    rows = {row["id"]: row for row in read_rows(str(tmp_path / "out"), "predictions")}
    assert read_rows(str(tmp_path / "out"), "dead_letters") == []
    assert_same_rows(rows, reference)
    loads, wrote = process_marks(marks)
    assert os.getpid() not in loads and wrote, (loads, wrote)  # the engine ran in SDK workers, not here
    assert summary.get("records") == SAMPLE_SIZE
    assert summary.get("engines") == sum(loads.values()) == len(wrote), (summary.counters, loads, wrote)
    job = cluster.jobs()[0]
    assert job["state"] == "FINISHED"
    per_slot = subtask_records(cluster, job["jid"], "Infer")
    assert len(per_slot) == 2 and all(per_slot), per_slot  # parallelism 2: both slots ran inference
    print(f"\nflink classify: {SAMPLE_SIZE} records, SDK worker pids {sorted(wrote)} (launcher {os.getpid()}), "
          f"engines {summary.get('engines')}, chunks per Infer subtask {per_slot}")


def test_a_killed_sdk_worker_is_replaced_and_every_record_is_written_once(cluster, marks, tmp_path):
    manifest_path = tasks.write_numbers(str(tmp_path / "numbers"), KILL_RECORDS)
    killed: list[int] = []
    done = threading.Event()

    def kill_first_worker_with_rows():  # once a worker has postprocessed records, mid-job
        while not done.is_set() and not killed:
            _, wrote = process_marks(marks)
            alive = set(wrote) & set(cluster.pool.sdk_worker_pids())
            if alive:
                killed.append(cluster.pool.kill_sdk_worker(min(alive)))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker_with_rows, daemon=True)
    killer.start()
    try:
        summary = run_bounded(["--input", manifest_path, "--output", str(tmp_path / "out"), "--batch-size", "8",
                               "--chunk-size", "50", "--model", "tests.clusters.tasks:numbers",
                               *cluster.portable_flags()], cluster)
    finally:
        done.set()
        killer.join()
    assert killed, "no SDK worker was running bundles to kill"
    rows = read_rows(str(tmp_path / "out"), "predictions")
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == KILL_RECORDS  # exactly once: none lost, none twice
    assert {row["id"]: row["doubled"] for row in rows} == {f"n{i}": 2.0 * i for i in range(KILL_RECORDS)}
    job = cluster.jobs()[0]
    failures = cluster.failures(job["jid"])
    restarts = len(failures)  # the job finished: Flink restarted it after each failure
    assert job["state"] == "FINISHED" and restarts >= 1, (job, failures)
    _, wrote = process_marks(marks)
    assert killed[0] in wrote and len(wrote) >= 2  # a new worker took over the killed one's work
    print(f"\nflink killed worker: {KILL_RECORDS} records, killed SDK worker pid {killed[0]}, Flink restarts "
          f"{restarts}, {len(rows)} rows, {len(set(ids))} distinct ids, summary records {summary.get('records')}; "
          f"failures: {failures}")


def test_a_job_whose_workers_keep_dying_fails_with_a_clear_error(cluster, marks, tmp_path):
    manifest_path = tasks.write_numbers(str(tmp_path / "numbers"), 20)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        run_bounded(["--input", manifest_path, "--output", str(tmp_path / "out"), "--model",
                     "tests.clusters.tasks:dying", *cluster.portable_flags()], cluster)
    assert "CANCELLED" in str(error.value)  # the SDK worker's control stream broke (Beam names no process)
    job = cluster.jobs()[0]
    assert job["state"] == "FAILED"
    failures = cluster.failures(job["jid"])
    assert len(failures) == RESTART_ATTEMPTS + 1, failures  # every attempt's worker died, then Flink gave up
    print(f"\nflink dying workers: failed after {time.monotonic() - start:.0f}s and {RESTART_ATTEMPTS} restarts: "
          f"{str(error.value)[:300]}; failures: {failures}")


def test_a_worker_pool_whose_python_lacks_beam_infer_fails_the_job_naming_it(cluster, manifest, tmp_path):  # noqa: F811
    """beam_infer's worker pool answers StartWorker with the import error at once (with Beam's stock pool the
    worker starts and fails the bundles, and the job fails only after Flink's restarts)."""
    pool = WorkerPool(cluster.processes, cluster.work_dir, name="pool-without-beam-infer", without_beam_infer=True)
    pool.wait_ready()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="No module named 'beam_infer'") as error:
        run_bounded(["--input", manifest, "--output", str(tmp_path / "out"), *cluster.portable_flags(pool)], cluster)
    print(f"\nflink pool without beam_infer: failed after {time.monotonic() - start:.0f}s: "
          f"{str(error.value)[:200]} ... {str(error.value)[-200:]}")
