import os
import threading
from typing import NoReturn

import pytest
import torch

pytest_plugins = ["tests.gcs.fixtures"]  # gcs_server, gcs: gs:// on loopback (fake-gcs-server behind a proxy)

REQUIRE_JVM = "BEAM_INFER_REQUIRE_JVM"  # set to 1 (as .ci/run does): a JVM test that would skip fails instead


JVM_CLUSTERS = "jvm-clusters"  # pytest-xdist group of the Flink and Spark cluster tests: one at a time, on one worker


def pytest_collection_modifyitems(config, items):
    for item in items:  # for `-n 2 --dist loadgroup` (the README's test command): a module's tests share a worker,
        cluster = "flink_cluster" in item.keywords or "spark_cluster" in item.keywords  # and its fixtures
        item.add_marker(pytest.mark.xdist_group(JVM_CLUSTERS if cluster else item.nodeid.split("::")[0]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run the gpu-marked tests on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def skip_or_fail_jvm_test(reason: str) -> NoReturn:
    """Skips a flink- or spark-marked test that cannot run here; fails it instead where REQUIRE_JVM=1 (CI)."""
    if os.environ.get(REQUIRE_JVM) == "1":
        pytest.fail(f"{reason} ({REQUIRE_JVM}=1: the Flink and Spark tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def sample_dir(tmp_path):
    """A directory with 48 generated shape JPEGs and their manifest.jsonl (id, uri, label)."""
    from beam_infer.sample import write_sample

    write_sample(str(tmp_path / "sample"), 48, seed=77)
    return tmp_path / "sample"


def engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("beam_infer")]


@pytest.fixture(autouse=True)
def _no_engine_thread_leaks_between_tests():
    yield
    from beam_infer.engine.engine import close_all_engines

    close_all_engines()


def write_bad_files(directory) -> tuple[str, str]:
    """A corrupt JPEG (a real one cut short) and a zero-byte file; returns their paths."""
    from beam_infer.sample import encode, render

    corrupt = os.path.join(directory, "corrupt.jpg")
    empty = os.path.join(directory, "empty.jpg")
    data = encode(render(5, 0)[1])
    with open(corrupt, "wb") as f:
        f.write(data[: len(data) // 3])
    open(empty, "wb").close()
    return corrupt, empty


class ProcessExits:
    """Stands in for errors.exit_process in tests: records the codes the engine exited with, instead of exiting."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.messages: list[str] = []
        self.called = threading.Event()

    def __call__(self, code: int, message: str) -> None:
        self.codes.append(code)
        self.messages.append(message)
        self.called.set()


@pytest.fixture(autouse=True)
def process_exits(monkeypatch) -> ProcessExits:
    """No test's engine may end pytest's process: a device fault records its exit code here instead, and the
    process-wide device-fault verdict starts clean for each test."""
    from beam_infer.engine import errors, health

    exits = ProcessExits()
    monkeypatch.setattr(errors, "exit_process", exits)
    monkeypatch.setattr(health, "_PROCESS", health._ProcessHealth())
    return exits
