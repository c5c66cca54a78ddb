"""A Spark 3.5 standalone cluster on this machine: one master and one worker JVM (2 cores), plus Beam's worker
pool, for running the job with `--environment_type=EXTERNAL` as on a real cluster.

Spark comes from the `pyspark` PyPI package (requirements.txt, Tests; pyspark 3.5.0 is a 317 MB sdist, no wheel),
whose folder holds Spark's jars (Scala 2.12) and `bin/spark-class`: SPARK_HOME points there. pyspark 3.5.0 is the
Spark (and Scala 2.12.18) that the job server tests/runners/job_servers.py builds puts on its classpath (Beam
2.62's Spark 3 runner is compiled against Spark 3.2.2 and declares Spark "provided"), so the job server's driver
and the cluster's executors run the same Spark.

The driver lives in the job-server JVM that Beam starts for each job, so its Spark conf cannot be given on a
command line: Spark reads `spark.*` Java system properties, and `driver_env()` passes them in JAVA_TOOL_OPTIONS
(with SPARK_LOCAL_IP=127.0.0.1), which every JVM the launcher starts picks up. The cluster's own JVMs and the
executors get neither. Every port is free, on 127.0.0.1.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import urllib.parse
import urllib.request

from tests.clusters.common import HOST, Processes, WorkerPool, free_port, tail
from tests.runners.job_servers import SPARK, _class_path, job_server_flags

SPARK_VERSION = "3.5.0"
START_TIMEOUT_S = 180  # two JVMs on a loaded 2-core machine
CORES = 2
WORKER_MEMORY = "2g"  # the worker's to give; an executor takes spark.executor.memory (default 1g) of it
# spark.task.maxFailures: a task is tried this often before its job fails (Spark's default is 4): 2 retries a killed
# worker's task once and keeps the dying-workers test short
MAX_TASK_FAILURES = 2


class Unavailable(RuntimeError):
    """Spark cannot be started here (no Java, no pyspark); the message says why."""


def spark_home() -> str:
    """The pyspark package's folder, which holds Spark's `jars/` and `bin/spark-class`.

    Raises:
        Unavailable: pyspark is not installed, or not Spark SPARK_VERSION.
    """
    try:
        import pyspark
    except ImportError as e:
        raise Unavailable(f"pyspark is not installed ({e}): pip install -r requirements.txt") from e
    home = os.path.dirname(pyspark.__file__)
    if not glob.glob(os.path.join(home, "jars", f"spark-core_2.12-{SPARK_VERSION}.jar")):
        raise Unavailable(f"pyspark {pyspark.__version__} at {home} holds no Spark {SPARK_VERSION} (Scala 2.12) "
                          "jars: pip install -r requirements.txt")
    return home


class SparkCluster:
    """A running Spark standalone cluster and worker pool; `stop()` (or leaving the `with`) ends and reaps them.

    Attributes:
        master_port: the master's RPC port (the job's spark://127.0.0.1:PORT).
        master_ui_port: the master's web UI; `/json/` there says which workers and applications it has.
        pool: the Beam worker pool the job's SDK workers come from.
        processes: the JVMs and the pool; their logs are in `<work_dir>/logs`, the executors' in
            `<work_dir>/work/<app>/<executor>/stderr`, the drivers' event logs in `<work_dir>/events`.
    """

    name = "spark"

    def __init__(self, work_dir: str, without_beam_infer: bool = False) -> None:
        self.work_dir = work_dir
        self.without_beam_infer = without_beam_infer
        self.processes = Processes(os.path.join(work_dir, "logs"))
        self.events_dir = os.path.join(work_dir, "events")
        self.master_port = self.master_ui_port = 0
        self.pool: WorkerPool | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> SparkCluster:
        """Starts the master, the worker and the worker pool; returns once the master lists the worker ALIVE. On
        failure everything started is stopped.

        Raises:
            Unavailable: no Java or no pyspark here.
            RuntimeError: a process did not come up; the message holds its log's end.
        """
        if shutil.which("java") is None:
            raise Unavailable("no `java` on PATH (Spark is a Java program)")
        home = spark_home()
        self.master_port, self.master_ui_port, worker_port, worker_ui_port = (free_port() for _ in range(4))
        spark_work = os.path.join(self.work_dir, "work")
        for d in (spark_work, self.events_dir):
            os.makedirs(d, exist_ok=True)
        env = dict(os.environ, SPARK_HOME=home, SPARK_LOCAL_IP=HOST, SPARK_LOG_DIR=self.processes.log_dir,
                   SPARK_WORKER_DIR=spark_work, SPARK_CONF_DIR=os.path.join(self.work_dir, "conf"))
        env.pop("JAVA_TOOL_OPTIONS", None)  # the driver's settings (driver_env) are not the cluster's
        spark_class = os.path.join(home, "bin", "spark-class")
        try:
            self.processes.start("master", [
                spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST,
                "--port", str(self.master_port), "--webui-port", str(self.master_ui_port)], env=env, cwd=self.work_dir)
            self.processes.start("worker", [
                spark_class, "org.apache.spark.deploy.worker.Worker", "--host", HOST, "--port", str(worker_port),
                "--webui-port", str(worker_ui_port), "--cores", str(CORES), "--memory", WORKER_MEMORY,
                "--work-dir", spark_work, self.master_url], env=env, cwd=self.work_dir)
            self.pool = WorkerPool(self.processes, self.work_dir, without_beam_infer=self.without_beam_infer)
            self._wait_for_worker(timeout_s)
            self.pool.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.master_port}"

    def _wait_for_worker(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            for name in ("master", "worker"):
                if not self.processes.alive(name):
                    raise RuntimeError(f"Spark's {name} exited ({self.processes.procs[name].returncode})\n"
                                       f"{self.processes.tail(name)}")
            try:
                seen = self.master_state()
                if any(w["state"] == "ALIVE" and w["cores"] >= CORES for w in seen.get("workers", [])):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Spark's worker did not register ALIVE with {CORES} cores within {timeout_s:.0f}s "
                           f"(the master says {seen})\n{self.processes.tail('master')}\n"
                           f"{self.processes.tail('worker')}")

    def master_state(self, timeout_s: float = 10.0) -> dict:
        """The master web UI's JSON: workers (state, cores, coresused), activeapps, completedapps, ..."""
        with urllib.request.urlopen(f"http://{HOST}:{self.master_ui_port}/json/", timeout=timeout_s) as r:
            return json.load(r)

    def active_apps(self) -> list[str]:
        """The ids of the applications (one per running Beam job) the master runs now."""
        return [app["id"] for app in self.master_state().get("activeapps", [])]

    def kill_app(self, app_id: str) -> None:
        """Kills application `app_id` through the master's web UI (as its "kill" link does): its executors stop,
        its driver (the job server) fails the Beam job. The way out of a job whose SDK workers cannot run it, which
        Beam's Spark runner would otherwise wait on for 3 minutes per task attempt (see test_spark_cluster.py)."""
        request = urllib.request.Request(f"http://{HOST}:{self.master_ui_port}/app/kill/",
                                         data=urllib.parse.urlencode({"id": app_id, "terminate": "true"}).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10.0):
            pass

    def job_flags(self, pool: WorkerPool | None = None) -> list[str]:
        """The flags that run a Beam job on this cluster with the SDK workers of `pool` (default: the cluster's
        pool), job-server jar included. Run the job with `driver_env()` in os.environ.

        Raises:
            tests.runners.job_servers.Unavailable: no job-server jar here.
        """
        assert self.pool is not None, "start() the cluster first"
        return ["--runner=SparkRunner", f"--spark_master_url={self.master_url}", "--environment_type=EXTERNAL",
                f"--environment_config={(pool or self.pool).address}", *job_server_flags(SPARK)]

    def driver_env(self) -> dict[str, str]:
        """Environment variables for the launcher, so that the job server's Spark driver binds to 127.0.0.1,
        starts no web UI, writes its event log (the record of every task attempt) under `events_dir`, and retries
        a failed task MAX_TASK_FAILURES times in all.

        With the job server built from Maven modules (job_servers.py), the executors load Beam's jars after
        Spark's own, so Spark's Guava 14 hides the newer Guava that Beam's GCS options need, and the first task of
        each job fails once (NoSuchMethodError: Preconditions.checkState) before its retry passes: putting that
        Guava first on the executors' classpath (spark.executor.extraClassPath) avoids it.
        """
        conf = {"spark.ui.enabled": "false", "spark.driver.host": HOST, "spark.driver.bindAddress": HOST,
                "spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{self.events_dir}",
                "spark.task.maxFailures": str(MAX_TASK_FAILURES)}
        guava = _beam_guava()
        if guava:
            conf["spark.executor.extraClassPath"] = guava
        return {"SPARK_LOCAL_IP": HOST, "JAVA_TOOL_OPTIONS": " ".join(f"-D{k}={v}" for k, v in conf.items())}

    def task_attempts(self) -> list[dict]:
        """Every task attempt that ended, in every job run on this cluster, from the drivers' event logs: app,
        stage, index (the task within its stage), attempt (0 first, then retries), launch and finish (ms since
        the epoch), reason ("Success" or why it failed, with the error's first line)."""
        attempts = []
        for path in sorted(glob.glob(os.path.join(self.events_dir, "*"))):
            app = os.path.basename(path).removesuffix(".inprogress")
            with open(path, errors="replace") as f:
                for line in f:
                    if '"SparkListenerTaskEnd"' not in line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:  # the last line of a log being written
                        continue
                    info, end = event["Task Info"], event.get("Task End Reason", {})
                    reason = end.get("Reason", "?")
                    if reason != "Success":
                        detail = end.get("Description") or end.get("Loss Reason") or end.get("Class Name") or ""
                        reason = f"{reason}: {str(detail).splitlines()[0] if detail else ''}"
                    attempts.append({"app": app, "stage": event["Stage ID"], "index": info["Index"],
                                     "attempt": info["Attempt"], "launch": info["Launch Time"],
                                     "finish": info["Finish Time"], "reason": reason})
        return attempts

    def apps(self) -> list[str]:
        """The applications (one per Beam job) whose drivers wrote an event log here, oldest first."""
        return sorted(os.path.basename(p).removesuffix(".inprogress")
                      for p in glob.glob(os.path.join(self.events_dir, "app-*")))

    def executor_log(self, lines: int = 60) -> str:
        """The end of the newest executor's stderr (the Beam runner side of the SDK harness), for error messages."""
        logs = sorted(glob.glob(os.path.join(self.work_dir, "work", "app-*", "*", "stderr")), key=os.path.getmtime)
        return f"--- {logs[-1]} ---\n{tail(logs[-1], lines)}" if logs else "(no executor log)"

    def stop(self) -> None:
        self.processes.stop()

    def __enter__(self) -> SparkCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _beam_guava() -> str | None:
    """The Guava jar on the built job server's classpath (None when Beam's own, shaded, jar is used)."""
    flags = job_server_flags(SPARK)
    if not flags:
        return None
    return next((p for p in _class_path(SPARK.built_jar) if os.path.basename(p).startswith("guava-")), None)
