"""The cluster fixtures' shared parts without a JVM: processes are ended with their children and reaped; the worker
pool runs this interpreter's Beam and reports the SDK workers it started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.clusters.common import HOST, Processes, WorkerPool, children, free_port, stop_groups

pytestmark = pytest.mark.timeout(60)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether `pid` has ended (a zombie counts) within `within_s`: a SIGKILL takes effect asynchronously, and on a
    loaded machine (two test workers on 2 cores) a process may still be running the instant after it was sent."""
    deadline = time.monotonic() + within_s
    while not _ended(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _ended(pid)


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie that init will reap
    except OSError:
        return True


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as s:
        s.bind((HOST, port))


def test_stop_ends_each_group_with_its_children_and_reaps_them(tmp_path):
    processes = Processes(str(tmp_path))
    proc = processes.start("parent", ["sh", "-c", "trap '' TERM; echo hello; sleep 300 & wait"])
    deadline = time.monotonic() + 10
    while not children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = children(proc.pid)
    processes.stop(grace_s=1)  # the shell ignores SIGTERM (its child does not): SIGKILL ends it
    assert proc.returncode is not None and _gone(child)
    assert "hello" in processes.tail("parent")


def test_stop_groups_ends_groups_started_elsewhere(tmp_path):
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stop_groups([proc.pid], grace_s=0.5)
    assert proc.wait(timeout=5) is not None


def test_worker_pool_runs_this_interpreter_and_lists_no_worker_before_a_job(tmp_path):
    with Processes(str(tmp_path / "logs")) as processes:
        pool = WorkerPool(processes, str(tmp_path))
        pool.wait_ready()
        assert pool.address == f"{HOST}:{pool.port}" and pool.sdk_worker_pids() == []
        with pytest.raises(LookupError):
            pool.kill_sdk_worker()
        python = os.path.join(tmp_path, "worker-pool-python")
        out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
        assert out.stdout.strip() == sys.prefix
