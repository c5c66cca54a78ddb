"""What the cluster fixtures share: free ports, child processes that are always reaped, and Beam's worker pool.

Every process is started in its own process group (session) and logs to a file, so that `Processes.stop()` can
end it together with whatever it spawned (a JVM's children, the worker pool's SDK workers) and a test's error
message can quote the log's tail. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOP_GRACE_S = 10.0  # SIGTERM, then this long for the group to go, then SIGKILL
_POLL_S = 0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, alive=lambda: True) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port` within `timeout_s` (False early if not alive())."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((HOST, port)) == 0:
                return True
        time.sleep(_POLL_S)
    return False


def tail(path: str, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' when it is not there)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """The ids of `pid`'s live child processes (from /proc; zombies left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # the command name may hold spaces and ')'
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return sorted(found)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class Processes:
    """Child processes, each in its own process group, logging to `<log_dir>/<name>.log`.

    Use as a context manager (or call stop()): on exit every group gets SIGTERM, then SIGKILL after
    STOP_GRACE_S, and every child is reaped, so no zombie and no orphaned JVM or SDK worker outlives a test.
    """

    log_dir: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        """Starts `args` as `name` (unique) in a new session; stdout and stderr go to log(name)."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} was started already")
        os.makedirs(self.log_dir, exist_ok=True)
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def tail(self, name: str, lines: int = 40) -> str:
        """The end of `name`'s log, headed by its name, for an error message."""
        return f"--- {self.log(name)} (last {lines} lines) ---\n{tail(self.log(name), lines)}"

    def groups(self) -> list[int]:
        """The process group ids (== the leaders' pids, as each was started in a new session)."""
        return [p.pid for p in self.procs.values()]

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ends every group (SIGTERM, then SIGKILL after `grace_s`) and reaps every child; safe to call twice."""
        groups = [p.pid for p in self.procs.values()]  # start_new_session: group id == the leader's pid
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
            for p in self.procs.values():
                p.poll()  # reaps a leader that exited, else its group stays "alive" as a zombie
            time.sleep(_POLL_S)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_groups(pgids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERMs process groups that this process did not start (`python -m tests.clusters ... down`), then
    SIGKILLs what is left after `grace_s`; their leaders were orphaned, so init reaps them."""
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(_POLL_S)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# In a worker pool started with without_beam_infer=True, `import beam_infer` fails in the SDK workers as it does
# where beam_infer is not installed (this interpreter has it installed editable, so the package is shadowed on the
# workers' PYTHONPATH).
_NO_BEAM_INFER = """\
raise ModuleNotFoundError("No module named 'beam_infer'", name="beam_infer")
"""


class WorkerPool:
    """beam_infer's worker pool (`python -m beam_infer.worker_pool`) for `--environment_type=EXTERNAL
    --environment_config=<address>`, on 127.0.0.1.

    The pool starts one SDK worker process per runner environment it is asked for, with a `python` script that
    execs this interpreter (sys.executable) with PYTHONPATH holding the repository root, so the workers import
    apache_beam, torch, beam_infer and the tests' models as the launcher does. With `without_beam_infer=True` the
    workers' `import beam_infer` fails (ModuleNotFoundError), as on a worker host where beam_infer is not installed
    (the pool itself imports it).
    """

    def __init__(self, processes: Processes, work_dir: str, name: str = "worker-pool",
                 without_beam_infer: bool = False,
                 port: int | None = None) -> None:
        self.processes = processes
        self.name = name
        self.port = port or free_port()
        pythonpath = [REPO_ROOT]
        if without_beam_infer:
            shadow = os.path.join(work_dir, f"{name}-shadow")
            os.makedirs(os.path.join(shadow, "beam_infer"), exist_ok=True)
            with open(os.path.join(shadow, "beam_infer", "__init__.py"), "w") as f:
                f.write(_NO_BEAM_INFER)
            pythonpath.insert(0, shadow)
        python = os.path.join(work_dir, f"{name}-python")
        with open(python, "w") as f:  # a script, not a symlink: a venv's python finds its pyvenv.cfg by its path
            f.write(f'#!/bin/sh\nPYTHONPATH={shlex.quote(os.pathsep.join(pythonpath))} exec '
                    f'{shlex.quote(sys.executable)} "$@"\n')
        os.chmod(python, 0o755)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1")
        env.pop("PYTHONHOME", None)
        self.proc = processes.start(name, [sys.executable, "-m", "beam_infer.worker_pool", "--host", HOST,
                                           "--port", str(self.port), "--worker-python", python,
                                           "--require", "tests.clusters.tasks"], env=env, cwd=work_dir)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the pool accepts connections; raises RuntimeError (with its log) otherwise."""
        if not wait_for_port(self.port, timeout_s, alive=lambda: self.proc.poll() is None):
            raise RuntimeError(f"the worker pool did not start on {self.address}\n{self.processes.tail(self.name)}")

    def sdk_worker_pids(self) -> list[int]:
        """The live SDK worker processes the pool has started (its children running Beam's SDK harness; not the
        pool's import check)."""
        return [pid for pid in children(self.proc.pid) if b"SdkHarness" in _cmdline(pid)]

    def kill_sdk_worker(self, pid: int | None = None) -> int:
        """SIGKILLs SDK worker `pid` (default: the one using the most CPU time, i.e. running bundles); returns its pid.

        Raises:
            LookupError: the pool has no live SDK worker.
        """
        pids = self.sdk_worker_pids()
        if pid is None:
            if not pids:
                raise LookupError(f"the worker pool at {self.address} runs no SDK worker")
            pid = max(pids, key=cpu_ticks)
        os.kill(pid, signal.SIGKILL)
        return pid

    def log_tail(self, lines: int = 40) -> str:
        return self.processes.tail(self.name, lines)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of `pid`, in clock ticks (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return 0
