"""A Flink 1.19 session cluster on this machine: one JobManager and one TaskManager JVM (2 slots), plus Beam's
worker pool, for running the job with `--environment_type=EXTERNAL` as on a real cluster.

Flink comes from the `apache-flink-libraries` PyPI package (requirements.txt, Tests), whose `lib/` holds
flink-dist and the log4j jars: the JVMs are started with `java -cp "lib/*"` and Flink's entry points, without
Flink's shell scripts. So the TaskManager's memory split is given in full in the generated config (the scripts
would otherwise derive it), with enough network buffers for Beam's batch job graph: each blocking result
partition being written holds taskmanager.network.sort-shuffle.min-buffers buffers (512 by default, so a few of
them exhaust 128 MB: "Insufficient number of network buffers: required 512, but only 510 available"); here 64.
Flink 1.19 matches the Flink 1.19 job server that tests/runners/job_servers.py builds. Every port is free, on
127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
import urllib.request

from apache_beam.utils.subprocess_server import JavaJarServer

from tests.clusters.common import HOST, Processes, WorkerPool, free_port, tail, wait_for_port
from tests.runners.job_servers import FLINK, job_server_flags

FLINK_VERSION = "1.19"  # apache-flink-libraries==1.19.3 (requirements.txt)

# The job server must speak the cluster's Flink: Beam's jar for Flink 1.19 where it can be had, else the built one.
FLINK_1_19 = dataclasses.replace(FLINK, flags=(*FLINK.flags, f"--flink_version={FLINK_VERSION}"))

START_TIMEOUT_S = 180  # two JVMs on a loaded 2-core machine
SLOTS = 2
# fixed-delay restart strategy: a killed SDK worker costs one restart, not the job; 2 keeps the dying-workers test short
RESTART_ATTEMPTS = 2
RESTART_DELAY = "1 s"

# The TaskManager's memory, in full (its process is about 1.1 GB): what Flink's scripts would derive from
# taskmanager.memory.process.size. Network memory is what Beam's batch job graph needs most: every blocking
# result partition being written holds taskmanager.network.sort-shuffle.min-buffers 32 KB buffers.
TASKMANAGER_MEMORY = {
    "taskmanager.memory.framework.heap.size": "128m",
    "taskmanager.memory.task.heap.size": "384m",
    "taskmanager.memory.framework.off-heap.size": "128m",
    "taskmanager.memory.task.off-heap.size": "32m",
    "taskmanager.memory.network.min": "128m",
    "taskmanager.memory.network.max": "128m",
    "taskmanager.memory.managed.size": "128m",
    "taskmanager.memory.jvm-metaspace.size": "192m",
    "taskmanager.memory.jvm-overhead.min": "128m",
    "taskmanager.memory.jvm-overhead.max": "128m",
}
TASKMANAGER_JVM = ["-Xms512m", "-Xmx512m", "-XX:MaxDirectMemorySize=288m", "-XX:MaxMetaspaceSize=192m"]
JOBMANAGER_JVM = ["-Xms256m", "-Xmx512m", "-XX:MaxMetaspaceSize=256m"]

_LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
appender.main.name = MainAppender
appender.main.type = File
appender.main.append = true
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
logger.akka.name = org.apache.pekko
logger.akka.level = WARN
logger.netty.name = org.apache.flink.shaded.netty4
logger.netty.level = WARN
"""


class Unavailable(RuntimeError):
    """Flink cannot be started here (no Java, no apache-flink-libraries); the message says why."""


def flink_home() -> str:
    """The folder of the apache-flink-libraries package (its `lib/` holds flink-dist).

    Raises:
        Unavailable: the package is not installed.
    """
    try:
        import pyflink  # apache-flink-libraries installs the namespace package pyflink with lib/, opt/, plugins/
    except ImportError as e:
        raise Unavailable(f"apache-flink-libraries is not installed ({e}): pip install -r requirements.txt") from e
    for path in pyflink.__path__:
        if glob.glob(os.path.join(path, "lib", "flink-dist-*.jar")):
            return path
    raise Unavailable(f"no lib/flink-dist-*.jar under {list(pyflink.__path__)}: reinstall apache-flink-libraries")


def _write_config(conf_dir: str, ports: dict[str, int], restart_attempts: int) -> None:
    settings = {
        "jobmanager.rpc.address": HOST,
        "jobmanager.rpc.port": ports["rpc"],
        "jobmanager.bind-host": HOST,
        "jobmanager.memory.process.size": "1024m",
        "rest.address": HOST,
        "rest.bind-address": HOST,
        "rest.port": ports["rest"],
        "blob.server.port": ports["blob"],
        "taskmanager.host": HOST,
        "taskmanager.bind-host": HOST,
        "taskmanager.rpc.port": ports["tm_rpc"],
        "taskmanager.data.port": ports["tm_data"],
        "taskmanager.numberOfTaskSlots": SLOTS,
        "taskmanager.cpu.cores": SLOTS,
        **TASKMANAGER_MEMORY,
        # Each blocking (batch) result partition takes this many network buffers while it is written (default
        # 512: a few of Beam's partitions at once exhaust 128 MB of network memory).
        "taskmanager.network.sort-shuffle.min-buffers": 64,
        "parallelism.default": SLOTS,
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": restart_attempts,
        "restart-strategy.fixed-delay.delay": RESTART_DELAY,
        "heartbeat.timeout": 30000,
        "metrics.internal.query-service.port": "0",
    }
    with open(os.path.join(conf_dir, "flink-conf.yaml"), "w") as f:
        f.writelines(f"{key}: {value}\n" for key, value in settings.items())
    with open(os.path.join(conf_dir, "log4j.properties"), "w") as f:
        f.write(_LOG4J)


class FlinkCluster:
    """A running Flink session cluster and worker pool; `stop()` (or leaving the `with`) ends and reaps them all.

    Attributes:
        rest_port: Flink's REST API (and web UI) on 127.0.0.1.
        pool: the Beam worker pool the job's SDK workers come from.
        processes: the JVMs and the pool; their logs are in `<work_dir>/logs`.
    """

    name = "flink"

    def __init__(self, work_dir: str, restart_attempts: int = RESTART_ATTEMPTS,
                 without_beam_infer: bool = False) -> None:
        self.work_dir = work_dir
        self.restart_attempts = restart_attempts
        self.without_beam_infer = without_beam_infer
        self.processes = Processes(os.path.join(work_dir, "logs"))
        self.rest_port = 0
        self.job_port = 0
        self.pool: WorkerPool | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> FlinkCluster:
        """Starts the JobManager, the TaskManager and the worker pool; returns once the TaskManager's 2 slots are
        registered. On failure everything started is stopped.

        Raises:
            Unavailable: no Java or no Flink here.
            RuntimeError: a process did not come up; the message holds its log's end.
        """
        java = shutil.which("java")
        if java is None:
            raise Unavailable("no `java` on PATH (Flink is a Java program)")
        home = flink_home()
        ports = {name: free_port() for name in ("rpc", "rest", "blob", "tm_rpc", "tm_data")}
        self.rest_port = ports["rest"]
        conf_dir = os.path.join(self.work_dir, "conf")
        os.makedirs(conf_dir, exist_ok=True)
        _write_config(conf_dir, ports, self.restart_attempts)
        tmp_dir = os.path.join(self.work_dir, "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        classpath = os.pathsep.join(sorted(glob.glob(os.path.join(home, "lib", "*.jar"))))
        try:
            for name, main, jvm in (
                    ("jobmanager", "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
                     JOBMANAGER_JVM),
                    ("taskmanager", "org.apache.flink.runtime.taskexecutor.TaskManagerRunner", TASKMANAGER_JVM)):
                self.processes.start(name, [
                    java, *jvm, f"-Dlog.file={self.processes.log(name)}.flink",
                    f"-Dlog4j.configurationFile=file:{os.path.join(conf_dir, 'log4j.properties')}",
                    f"-Djava.io.tmpdir={tmp_dir}", "-cp", classpath, main, "--configDir", conf_dir,
                    "-Dio.tmp.dirs=" + tmp_dir], env=dict(os.environ, FLINK_CONF_DIR=conf_dir), cwd=self.work_dir)
            self.pool = WorkerPool(self.processes, self.work_dir, without_beam_infer=self.without_beam_infer)
            self._wait_for_slots(timeout_s)
            self.pool.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_slots(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            for name in ("jobmanager", "taskmanager"):
                if not self.processes.alive(name):
                    raise RuntimeError(f"Flink's {name} exited ({self.processes.procs[name].returncode})\n"
                                       f"{self.tail(name)}")
            try:
                seen = self.rest("/taskmanagers")
                if sum(tm.get("slotsNumber", 0) for tm in seen.get("taskmanagers", [])) >= SLOTS:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Flink's TaskManager did not register {SLOTS} slots within {timeout_s:.0f}s "
                           f"(REST says {seen})\n{self.tail('jobmanager')}\n{self.tail('taskmanager')}")

    def tail(self, name: str, lines: int = 40) -> str:
        """The end of a process's log; for the JVMs, Flink's own log (log4j) too."""
        text = self.processes.tail(name, lines)
        flink_log = self.processes.log(name) + ".flink"
        if os.path.exists(flink_log):
            text += f"\n--- {flink_log} ---\n{tail(flink_log, lines)}"
        return text

    def rest(self, path: str, timeout_s: float = 10.0) -> dict:
        """GETs Flink's REST API at `path` (e.g. "/jobs/overview") and returns the parsed JSON."""
        with urllib.request.urlopen(f"http://{HOST}:{self.rest_port}{path}", timeout=timeout_s) as r:
            return json.load(r)

    def rest_patch(self, path: str, timeout_s: float = 10.0) -> None:
        """PATCHes Flink's REST API at `path` (e.g. "/jobs/<id>?mode=cancel" cancels a job)."""
        request = urllib.request.Request(f"http://{HOST}:{self.rest_port}{path}", method="PATCH")
        with urllib.request.urlopen(request, timeout=timeout_s):
            pass

    def jobs(self) -> list[dict]:
        """The cluster's jobs, newest first (jid, name, state, start-time, ...)."""
        return sorted(self.rest("/jobs/overview")["jobs"], key=lambda j: j["start-time"], reverse=True)

    def failures(self, job_id: str) -> list[str]:
        """Job `job_id`'s failures, oldest first, each as its exception's first line (/jobs/<id>/exceptions; Flink
        keeps the last 16). Each failure but a failed job's last was followed by a restart."""
        history = self.rest(f"/jobs/{job_id}/exceptions").get("exceptionHistory", {}).get("entries", [])
        return [(e.get("stacktrace") or e.get("exceptionName", "")).strip().split("\n")[0] for e in reversed(history)]

    def job_flags(self) -> list[str]:
        """The flags that run a Beam job on this cluster with the pool's SDK workers (job-server jar included).

        Raises:
            tests.runners.job_servers.Unavailable: no job-server jar here.
        """
        assert self.pool is not None, "start() the cluster first"
        return ["--runner=FlinkRunner", f"--flink_master={HOST}:{self.rest_port}", f"--flink_version={FLINK_VERSION}",
                "--environment_type=EXTERNAL", f"--environment_config={self.pool.address}",
                f"--parallelism={SLOTS}", *job_server_flags(FLINK_1_19)]

    def job_server_jar(self) -> str:
        """The Flink 1.19 job-server jar (Beam's, else the one tests/runners/job_servers.py built), on this disk.

        Raises:
            tests.runners.job_servers.Unavailable: no job-server jar here.
        """
        flags = job_server_flags(FLINK_1_19)
        return flags[0].partition("=")[2] if flags else JavaJarServer.local_jar(FLINK_1_19.beam_jar())

    def start_job_server(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Starts Beam's Flink job server against this cluster, once, as a cluster process; returns its job
        endpoint. FlinkRunner starts (and stops) one per job, which costs each job a JVM start (~10 s here).

        Raises:
            RuntimeError: it did not come up; the message holds its log's end.
        """
        if "job-server" not in self.processes.procs:
            self.job_port = free_port()
            artifacts = os.path.join(self.work_dir, "artifacts")
            self.processes.start("job-server", [
                shutil.which("java") or "java", "-jar", self.job_server_jar(),
                "--flink-master", f"http://{HOST}:{self.rest_port}", "--job-host", HOST,
                "--job-port", str(self.job_port), "--artifact-port", "0", "--expansion-port", "0",
                "--artifacts-dir", artifacts], cwd=self.work_dir)
            if not wait_for_port(self.job_port, timeout_s, alive=lambda: self.processes.alive("job-server")):
                raise RuntimeError(f"Beam's Flink job server did not start\n{self.tail('job-server')}")
        return f"{HOST}:{self.job_port}"

    def portable_flags(self, pool: WorkerPool | None = None) -> list[str]:
        """Flags that submit to this cluster through the job server that start_job_server() keeps running
        (`--runner=PortableRunner --job_endpoint=...`), with `pool` (default: the cluster's) as the environment."""
        pool = pool or self.pool
        assert pool is not None, "start() the cluster first"
        return ["--runner=PortableRunner", f"--job_endpoint={self.start_job_server()}",
                "--environment_type=EXTERNAL", f"--environment_config={pool.address}", f"--parallelism={SLOTS}"]

    def stop(self) -> None:
        self.processes.stop()

    def __enter__(self) -> FlinkCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
