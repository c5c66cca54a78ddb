"""How the JVM tests find a job-server jar, and when they skip or fail. No JVM, no network."""

import pytest
from apache_beam.utils.subprocess_server import JavaJarServer

from tests import conftest
from tests.runners import job_servers
from tests.runners.job_servers import FLINK, SPARK, Unavailable, job_server_flags

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_beam_jar(monkeypatch, tmp_path):
    """Beam's own jar cannot be had (as here, where Maven Central answers 404), and the jar cache is empty."""

    def unavailable(url, *args, **kwargs):
        raise RuntimeError(f"Unable to fetch remote job server jar at {url}: HTTP Error 404: Not Found")

    monkeypatch.setattr(JavaJarServer, "local_jar", unavailable)
    monkeypatch.setattr(JavaJarServer, "JAR_CACHE", str(tmp_path / "jars"))
    return tmp_path


def test_the_runners_own_jar_is_used_when_beam_can_fetch_or_has_cached_it(monkeypatch):
    asked = []
    monkeypatch.setattr(JavaJarServer, "local_jar", lambda url, *args, **kwargs: asked.append(url) or "/cached.jar")
    assert job_server_flags(FLINK) == [] and job_server_flags(SPARK) == []
    assert [url.rsplit("/", 1)[-1] for url in asked] == ["beam-runners-flink-2.2-job-server-2.77.0.jar",
                                                         "beam-runners-spark-3-job-server-2.77.0.jar"]


def test_without_beams_jar_a_complete_built_jar_is_passed_with_the_runners_jar_flag(no_beam_jar, monkeypatch):
    dependency = no_beam_jar / "m2" / "some-dependency-1.0.jar"
    dependency.parent.mkdir()
    dependency.write_bytes(b"")
    monkeypatch.setattr(job_servers.shutil, "which", lambda name: None)  # build() must not need Maven now
    path = FLINK.built_jar
    (no_beam_jar / "jars").mkdir()
    with job_servers.zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", job_servers._manifest(FLINK.main_class, [str(dependency)] * 40))
    assert job_servers.build(FLINK) == path
    assert job_server_flags(FLINK) == [f"--flink_job_server_jar={path}"]
    dependency.unlink()  # ~/.m2 cleaned: the jar names a missing file, so it no longer counts
    with pytest.raises(Unavailable, match="python -m tests.runners.job_servers"):
        job_server_flags(FLINK)


def test_without_any_jar_the_reason_names_beams_error_and_how_to_build_one(no_beam_jar):
    with pytest.raises(Unavailable) as e:
        job_server_flags(SPARK)
    assert "404" in str(e.value) and "python -m tests.runners.job_servers" in str(e.value)
    (no_beam_jar / "jars").mkdir()
    with open(SPARK.built_jar, "wb") as half_written:  # not a jar: unusable, not an error
        half_written.write(b"PK\x03")
    with pytest.raises(Unavailable):
        job_server_flags(SPARK)


def test_a_jvm_test_that_cannot_run_skips_on_a_users_machine(monkeypatch):
    monkeypatch.delenv(conftest.REQUIRE_JVM, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no java"):
        conftest.skip_or_fail_jvm_test("no java")


def test_a_jvm_test_that_cannot_run_fails_where_ci_requires_the_jvm(monkeypatch):
    monkeypatch.setenv(conftest.REQUIRE_JVM, "1")
    with pytest.raises(pytest.fail.Exception, match="no java.*must run, not skip"):
        conftest.skip_or_fail_jvm_test("no java")


def test_java_missing_says_so_when_there_is_no_java_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert "no `java` on PATH" in job_servers.java_missing()
