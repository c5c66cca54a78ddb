"""The job-server jars that the flink- and spark-marked tests run with; `python -m tests.runners.job_servers`
makes sure there is one for each (CI runs it before pytest).

Beam 2.77's FlinkRunner and SparkRunner download beam-runners-flink-2.2-job-server-2.77.0.jar and
beam-runners-spark-3-job-server-2.77.0.jar from Maven Central into Beam's jar cache (~/.apache_beam/cache/jars)
and start them. Where that works, the tests use exactly that. The Maven Central this project reaches serves no
Beam job-server jar at all (HTTP 404, for every Flink version and Beam version), but it does serve Beam's runner
modules and their dependencies; the newest complete set is Beam 2.62.0's. So, failing Beam's own jar, this
module resolves that set with Maven and writes a classpath jar (a manifest whose Class-Path names the resolved
jars) into Beam's jar cache, and the tests pass it as --flink_job_server_jar / --spark_job_server_jar: the same
FlinkRunner / SparkRunner and embedded Flink 1.19 / local Spark 3.5, with a Java runner older than the Python
SDK. Both jars are cached: Beam's by Beam, ours in the same folder (and Maven's in ~/.m2), so a second run
downloads nothing.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.flink_runner import FlinkJarJobServer
from apache_beam.runners.portability.job_server import JavaJarJobServer
from apache_beam.runners.portability.spark_runner import SparkJarJobServer
from apache_beam.utils.subprocess_server import JavaJarServer

_MAVEN_TIMEOUT_S = 1200  # resolves about 200 MB of jars on a cold ~/.m2; a warm one takes seconds
_JAVA_TIMEOUT_S = 60  # `java -version`, on a loaded 2-core machine
_MANIFEST_LINE = 72  # the jar manifest's line limit, in bytes; longer values continue on lines starting " "


class Unavailable(RuntimeError):
    """No job-server jar can be had for a runner here; the message says why."""


@dataclass(frozen=True)
class JobServer:
    """A portable runner's job server: Beam's own jar, else one built from Maven modules.

    Attributes:
        runner: the --runner name.
        flags: the runner's flags for a local run (what the tests pass).
        jar_flag: the flag that points the runner at a job-server jar of our choosing.
        beam_server: Beam's class for this job server; it knows the jar Beam wants.
        main_class: the job server's entry point in the Maven modules.
        maven: Maven coordinates (group:artifact:version) whose dependency closure is the job server.
    """

    runner: str
    flags: tuple[str, ...]
    jar_flag: str
    beam_server: type[JavaJarJobServer]
    main_class: str
    maven: tuple[str, ...]

    def beam_jar(self) -> str:
        """The URL (or path) of the jar that Beam itself would start for `flags`."""
        return self.beam_server(PipelineOptions(list(self.flags))).path_to_jar()

    @property
    def built_jar(self) -> str:
        """Where our classpath jar lives: Beam's jar cache, named for the runner and its Maven set."""
        digest = hashlib.sha256(" ".join((self.main_class, *self.maven)).encode()).hexdigest()[:12]
        return os.path.join(JavaJarServer.JAR_CACHE, f"beam-infer-{self.runner}-job-server-{digest}.jar")


FLINK = JobServer(
    runner="FlinkRunner",
    flags=("--runner=FlinkRunner", "--flink_master=[local]"),
    jar_flag="--flink_job_server_jar",
    beam_server=FlinkJarJobServer,
    main_class="org.apache.beam.runners.flink.FlinkJobServerDriver",
    maven=("org.apache.beam:beam-runners-flink-1.19:2.62.0",),  # brings Flink 1.19.0 as compile dependencies
)
SPARK = JobServer(
    runner="SparkRunner",
    flags=("--runner=SparkRunner", "--spark_master_url=local[2]"),
    jar_flag="--spark_job_server_jar",
    beam_server=SparkJarJobServer,
    main_class="org.apache.beam.runners.spark.SparkJobServerDriver",
    # Beam's runner declares Spark "provided"; 3.5.0 is the Spark its 3.x job server ships with, and runs on Java 17.
    maven=("org.apache.beam:beam-runners-spark-3:2.62.0", "org.apache.spark:spark-core_2.12:3.5.0",
           "org.apache.spark:spark-streaming_2.12:3.5.0"),
)
JOB_SERVERS = (FLINK, SPARK)


def java_missing() -> str | None:
    """Why Java cannot start job servers here, or None when `java -version` runs."""
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH (the Flink and Spark job servers are Java programs)"
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=_JAVA_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`java -version` failed: {e}"
    return None


def job_server_flags(server: JobServer) -> list[str]:
    """The flags that give `server.runner` a job-server jar that is here: none when Beam's own jar is cached or
    downloads now, else our built jar's flag.

    Raises:
        Unavailable: neither Beam's jar nor a complete built jar is here; says how to build one.
    """
    try:
        JavaJarServer.local_jar(server.beam_jar())  # Beam's cache first; downloads into it otherwise
        return []
    except Exception as e:  # Beam raises RuntimeError, OSError or URLError here
        beam_error = e
    if _complete(server.built_jar):
        return [f"{server.jar_flag}={server.built_jar}"]
    raise Unavailable(f"Beam's job-server jar for {server.runner} cannot be had ({beam_error}), and there is no "
                      f"complete fallback jar at {server.built_jar}: build it with `python -m "
                      "tests.runners.job_servers` (needs Maven)")


def build(server: JobServer) -> str:
    """Resolves `server.maven` with Maven and writes the classpath jar at `server.built_jar`, unless it is there.

    Raises:
        Unavailable: Maven is missing or failed.
    """
    if _complete(server.built_jar):
        return server.built_jar
    mvn = shutil.which("mvn")
    if mvn is None:
        raise Unavailable(f"no `mvn` on PATH to build the {server.runner} job server from Maven Central")
    with tempfile.TemporaryDirectory(prefix="beam_infer_job_server_") as work:
        pom = pathlib.Path(work, "pom.xml")
        pom.write_text(_pom(server.maven))
        classpath = pathlib.Path(work, "classpath.txt")
        proc = subprocess.run([mvn, "-B", "-q", "-f", str(pom), "dependency:build-classpath",
                               f"-Dmdep.outputFile={classpath}"],
                              capture_output=True, text=True, timeout=_MAVEN_TIMEOUT_S)
        if proc.returncode != 0:
            raise Unavailable(f"Maven could not resolve {', '.join(server.maven)}:\n{proc.stdout[-3000:]}")
        jars = classpath.read_text().strip().split(os.pathsep)
    os.makedirs(os.path.dirname(server.built_jar), exist_ok=True)
    tmp = server.built_jar + ".tmp"
    with zipfile.ZipFile(tmp, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", _manifest(server.main_class, jars))
    os.replace(tmp, server.built_jar)  # atomic: a reader never sees half a jar
    return server.built_jar


def _pom(coordinates: tuple[str, ...]) -> str:
    deps = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in (c.split(":") for c in coordinates))
    return ('<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            "<groupId>beam_infer.tests</groupId><artifactId>job-server</artifactId><version>0</version>"
            f"<dependencies>{deps}</dependencies></project>")


def _manifest(main_class: str, jars: list[str]) -> str:
    class_path = "Class-Path: " + " ".join(pathlib.Path(j).as_uri() for j in jars)
    lines = [class_path[:_MANIFEST_LINE]]
    lines += [" " + class_path[i:i + _MANIFEST_LINE - 1] for i in range(_MANIFEST_LINE, len(class_path),
                                                                         _MANIFEST_LINE - 1)]
    return "\r\n".join(["Manifest-Version: 1.0", f"Main-Class: {main_class}", *lines]) + "\r\n"


def _class_path(jar: str) -> list[str]:
    with zipfile.ZipFile(jar) as z:
        manifest = z.read("META-INF/MANIFEST.MF").decode().replace("\r\n ", "").splitlines()
    value = next(line for line in manifest if line.startswith("Class-Path: "))
    return [unquote(urlparse(uri).path) for uri in value.removeprefix("Class-Path: ").split()]


def _complete(jar: str) -> bool:
    """Whether `jar` is a classpath jar and every jar its manifest names is still there (~/.m2 may have been
    cleaned)."""
    try:
        return all(os.path.exists(p) for p in _class_path(jar))
    except (OSError, zipfile.BadZipFile, KeyError, StopIteration):  # missing, not a jar, or no Class-Path
        return False


def main() -> int:
    """Makes sure each runner has a job-server jar: Beam's own, else one built here. Exit status 1 if one has not."""
    failed = False
    for server in JOB_SERVERS:
        try:
            flags = job_server_flags(server)
        except Unavailable:
            try:
                flags = [f"{server.jar_flag}={build(server)}"]
            except (Unavailable, OSError, subprocess.SubprocessError) as e:
                print(f"{server.runner}: no job server: {e}", file=sys.stderr)
                failed = True
                continue
        print(f"{server.runner}:", " ".join(flags) or "Beam's own job-server jar")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
