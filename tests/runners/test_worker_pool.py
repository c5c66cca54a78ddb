"""beam_infer's worker pool (`python -m beam_infer.worker_pool`), spoken to over gRPC as a runner does: it refuses to
start SDK workers its interpreter cannot run, naming the missing module, and otherwise starts them with that
interpreter and stops them when asked or when it is stopped. (On real clusters: tests/clusters.)"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import grpc
import pytest
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc, endpoints_pb2

from beam_infer.worker_pool import import_error
from tests.clusters.common import HOST, children, free_port, wait_for_port

pytestmark = pytest.mark.timeout(120)


def test_import_error_names_the_first_module_the_interpreter_lacks():
    assert import_error(sys.executable, ["json", "apache_beam.runners.worker.sdk_worker"]) is None
    assert import_error(sys.executable, ["json", "no_such_module_here", "no_such_module_either"]) == (
        "ModuleNotFoundError: No module named 'no_such_module_here'")
    assert "FileNotFoundError" in import_error("/no/such/python", ["json"])


def shim(path, body: str) -> str:
    """A `python` for the workers: `body` (sh) first, then this interpreter."""
    path.write_text(f'#!/bin/sh\n{body}\nexec {shlex.quote(sys.executable)} "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def start_pool(tmp_path):
    pools: list[subprocess.Popen] = []

    def start(worker_python: str, *flags: str):
        port = free_port()
        log = open(tmp_path / f"pool-{port}.log", "wb")
        pool = subprocess.Popen([sys.executable, "-m", "beam_infer.worker_pool", "--host", HOST, "--port", str(port),
                                 "--worker-python", worker_python, *flags], stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp_path)  # not the repository: `python -c` imports from its folder first
        pools.append(pool)
        assert wait_for_port(port, 60, alive=lambda: pool.poll() is None), (tmp_path / f"pool-{port}.log").read_text()
        channel = grpc.insecure_channel(f"{HOST}:{port}")
        return pool, beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel), tmp_path / f"pool-{port}.log"

    yield start
    for pool in pools:  # SIGTERM first, so that a pool stops the workers it started even when a test failed
        pool.terminate()
        try:
            pool.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait()


def start_request(worker_id: str) -> beam_fn_api_pb2.StartWorkerRequest:
    return beam_fn_api_pb2.StartWorkerRequest(
        worker_id=worker_id, control_endpoint=endpoints_pb2.ApiServiceDescriptor(url="127.0.0.1:9"))


@pytest.mark.parametrize("lacks", ["beam_infer", "apache_beam"])
def test_a_pool_whose_workers_cannot_import_a_module_says_so_at_start_up_and_to_each_start_worker(
        start_pool, tmp_path, lacks):
    if lacks == "beam_infer":  # shadowed: as where beam_infer is not installed
        shadow = tmp_path / "shadow" / "beam_infer"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'beam_infer'\")\n")
        python = shim(tmp_path / "python", f"export PYTHONPATH={shlex.quote(str(shadow.parent))}")
    else:  # no site-packages: another environment, where Beam's own pool would start a worker that dies at once
        python = str(tmp_path / "python")
        (tmp_path / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
        (tmp_path / "python").chmod(0o755)
    pool, stub, log = start_pool(python)
    deadline = time.monotonic() + 60
    while "every StartWorker fails until it can" not in log.read_text():  # the start-up check, before any job
        assert time.monotonic() < deadline and pool.poll() is None, log.read_text()
        time.sleep(0.1)
    assert f"No module named '{lacks}'" in log.read_text()
    response = stub.StartWorker(start_request("w1"), timeout=60)
    assert f"No module named '{lacks}'" in response.error and python in response.error
    assert children(pool.pid) == []  # no worker was started


def test_a_pool_starts_each_worker_with_its_interpreter_and_stops_it_on_request_and_on_sigterm(
        start_pool, tmp_path):
    record = tmp_path / "workers.txt"
    # The check imports with the real interpreter; a worker records its command line and waits to be stopped.
    python = shim(tmp_path / "python", f'case "$2" in *SdkHarness*) echo "$2" >> {shlex.quote(str(record))}; '
                                       'exec sleep 60;; esac')
    pool, stub, _ = start_pool(python, "--require", "json")
    assert stub.StartWorker(start_request("w1"), timeout=60).error == ""
    assert stub.StartWorker(start_request("w2"), timeout=60).error == ""
    deadline = time.monotonic() + 30
    while len(children(pool.pid)) < 2 or not record.exists() or len(record.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline, "the pool did not start two workers"
        time.sleep(0.05)
    commands = record.read_text().splitlines()
    assert all("SdkHarness('127.0.0.1:9'" in c for c in commands), commands
    assert sorted(c.split("worker_id=")[1].split(",")[0] for c in commands) == ["'w1'", "'w2'"]
    first, second = children(pool.pid)
    stub.StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id="w1"), timeout=30)
    assert len(children(pool.pid)) == 1
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(timeout=30) == 0
    for pid in (first, second):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
