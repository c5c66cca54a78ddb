"""Beam's worker pool for `--environment_type=EXTERNAL`, made to fail fast: `python -m beam_infer.worker_pool`.

On Flink and Spark an EXTERNAL environment asks a worker pool (a gRPC service, usually a sidecar beside each task
manager or Spark worker) to start SDK worker processes. Beam's own pool
(`python -m apache_beam.runners.worker.worker_pool_main`) runs each worker with the first `python` on PATH. When
that interpreter lacks apache_beam, the worker dies before it connects and the runner waits for it for ever: the
job hangs. When it lacks beam_infer or the module of the job's model, the worker fails each bundle: Flink fails the
job naming the module, but a Spark task waits 3 minutes per attempt for the worker's data channel and fails without
naming it. This pool:

- runs the workers with its own interpreter (`--worker-python` to pick another; a wrapper script must `exec` the
  interpreter, so that stopping a worker stops it);
- checks, at start-up and until it passes, that this interpreter imports Beam's SDK harness, beam_infer and every
  `--require` module, and answers the runner's StartWorker with the import error while it does not, so the task
  (and, after the runner's retries, the job) fails within seconds with `No module named '...'`;
- listens on `--host` (default every interface, IPv6 included, as Beam's pool; 127.0.0.1 for a local cluster);
- lets the workers write to its own stdout (Beam's pool pipes their stdout and never reads it, so a worker that
  prints 64 KiB blocks);
- stops its workers when it is stopped (SIGTERM or SIGINT): all of them SIGTERMed at once, SIGKILLed 10 s later.

Like Beam's pool in process mode, the workers get no staged artifacts (`--setup_file`, `--requirements_file`): what
they import must be installed where the pool runs. Serve one runner JVM (one Flink task manager, one Spark executor)
per pool: Beam numbers worker ids per JVM, so two JVMs may both ask for worker "1-1" (this pool keeps and stops
both, but a StopWorker for that id stops the older one).

Usage (a sidecar beside each Flink task manager or Spark worker, then `--environment_config=localhost:50000`):

    python -m beam_infer.worker_pool --port 50000 --require my_models
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
import traceback

import grpc
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor

_LOGGER = logging.getLogger(__name__)
HARNESS_MODULE = "apache_beam.runners.worker.sdk_worker"
_CHECK_TIMEOUT_S = 120.0  # importing torch and beam_infer on a cold disk; a hung import is an error too
_FAILED_CHECK_REUSE_S = 10.0  # StartWorkers that queued behind a failed check get its error instead of another one
_STOP_GRACE_S = 10.0  # SIGTERM, then this long before SIGKILL
_WORKER_MAIN = ("from apache_beam.runners.worker.sdk_worker import SdkHarness; "
                "SdkHarness({url!r}, worker_id={worker_id!r}, state_cache_size={state_cache_size}, "
                "data_buffer_time_limit_ms={data_buffer_time_limit_ms}).run()")


def import_error(python: str, modules: list[str]) -> str | None:
    """Why `python` cannot import every one of `modules` (the last line of its traceback), or None when it can."""
    code = "".join(f"import {m}\n" for m in modules)
    try:
        check = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    if check.returncode == 0:
        return None
    lines = check.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {check.returncode}"


class CheckedWorkerPool(BeamFnExternalWorkerPoolServicer):
    """Beam's pool servicer, starting workers with `worker_python` once it imports `modules` (see the module doc).

    One check runs at a time; StartWorkers that arrive meanwhile wait for it. A passed check is not repeated; a
    failed one is repeated by the next StartWorker that arrives more than _FAILED_CHECK_REUSE_S after it (a fixed
    environment needs no restart of the pool).
    """

    def __init__(self, worker_python: str = sys.executable, modules: list[str] | None = None,
                 state_cache_size: int = 0, data_buffer_time_limit_ms: int = 0) -> None:
        super().__init__(use_process=True, state_cache_size=state_cache_size,
                         data_buffer_time_limit_ms=data_buffer_time_limit_ms)
        self.worker_python = worker_python
        self.modules = [HARNESS_MODULE, "beam_infer", *(modules or [])]
        self._check_lock = threading.Lock()
        self._passed = False
        self._failure: tuple[float, str] | None = None  # (monotonic time it ended, error) of the last failed check
        self._workers_lock = threading.Lock()  # _workers and _closing
        self._workers: list[tuple[str, subprocess.Popen]] = []  # (worker id, process), oldest first
        self._closing = False

    def check(self) -> str | None:
        """The error that keeps this pool from starting workers, or None."""
        arrived = time.monotonic()
        with self._check_lock:
            if self._passed:
                return None
            if self._failure is not None and self._failure[0] >= arrived - _FAILED_CHECK_REUSE_S:
                return self._failure[1]
            error = import_error(self.worker_python, self.modules)
            self._passed = error is None
            self._failure = None if error is None else (time.monotonic(), error)
            return error

    def StartWorker(self, request: beam_fn_api_pb2.StartWorkerRequest,
                    context) -> beam_fn_api_pb2.StartWorkerResponse:
        try:
            error = self.check()
            if error is not None:
                message = (f"the worker pool's interpreter {self.worker_python} cannot run the job's SDK workers: "
                           f"{error}")
                _LOGGER.error("%s (worker %s not started)", message, request.worker_id)
                return beam_fn_api_pb2.StartWorkerResponse(error=message)
            command = [self.worker_python, "-c", _WORKER_MAIN.format(
                url=request.control_endpoint.url, worker_id=request.worker_id,
                state_cache_size=self._state_cache_size, data_buffer_time_limit_ms=self._data_buffer_time_limit_ms)]
            with self._workers_lock:  # so that stop_workers() sees every worker started before it
                if self._closing:
                    return beam_fn_api_pb2.StartWorkerResponse(error="the worker pool is stopping")
                if any(worker_id == request.worker_id for worker_id, _ in self._workers):
                    _LOGGER.warning("a second worker %s: does more than one runner JVM use this pool?",
                                    request.worker_id)
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True)
                self._workers.append((request.worker_id, process))
            _LOGGER.info("started SDK worker %s as process %d", request.worker_id, process.pid)
            return beam_fn_api_pb2.StartWorkerResponse()
        except Exception:  # as Beam's pool: the runner gets the error, not a bare gRPC UNKNOWN
            _LOGGER.exception("starting SDK worker %s failed", request.worker_id)
            return beam_fn_api_pb2.StartWorkerResponse(error=traceback.format_exc())

    def StopWorker(self, request: beam_fn_api_pb2.StopWorkerRequest,
                   context) -> beam_fn_api_pb2.StopWorkerResponse:
        with self._workers_lock:
            found = next((w for w in self._workers if w[0] == request.worker_id), None)
            if found is not None:
                self._workers.remove(found)
        if found is not None:
            _LOGGER.info("stopping SDK worker %s", request.worker_id)
            _stop([found[1]])
        return beam_fn_api_pb2.StopWorkerResponse()

    def stop_workers(self) -> None:
        """Refuses new workers and ends every one this pool started: SIGTERM to all, SIGKILL _STOP_GRACE_S later."""
        with self._workers_lock:
            self._closing = True
            processes = [process for _, process in self._workers]
            self._workers.clear()
        _stop(processes)


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERMs `processes` together, SIGKILLs those still running after _STOP_GRACE_S, and reaps them all."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(pool: CheckedWorkerPool, host: str, port: int) -> tuple[grpc.Server, int]:
    """Starts a gRPC server for `pool` on host:port (0: any free port); returns it and its port.

    Raises:
        OSError: the address cannot be listened on.
    """
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpcio raises where it cannot bind
        raise OSError(f"cannot listen on {host}:{port}: {e}") from e
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()
    return server, bound


class _Stop:
    """Set by SIGINT / SIGTERM. A plain attribute: a signal handler must not take a lock (Event.set does)."""

    requested = False

    def __call__(self, *_) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beam_infer.worker_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50000, help="port to listen on (default 50000, Beam's)")
    parser.add_argument("--host", default="[::]", help="address to listen on (default: every interface)")
    parser.add_argument("--worker-python", default=sys.executable,
                        help="interpreter of the SDK workers (default: this one)")
    parser.add_argument("--require", action="append", default=[], metavar="MODULE",
                        help="a module the workers must import besides apache_beam and beam_infer, e.g. the one "
                             "holding --model (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = _Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    pool = CheckedWorkerPool(args.worker_python, args.require)
    try:
        server, port = serve(pool, args.host, args.port)  # at once: a runner's StartWorker meanwhile waits
    except OSError as e:
        _LOGGER.error("%s", e)
        return 1
    _LOGGER.info("beam_infer worker pool listening on %s:%d, workers run %s", args.host, port, args.worker_python)

    def check_at_start_up():  # say it where the person who deploys the pool looks, before any job comes
        error = pool.check()
        if error is not None:
            _LOGGER.error("the workers' interpreter %s cannot run the job: %s; every StartWorker fails until it "
                          "can", args.worker_python, error)

    threading.Thread(target=check_at_start_up, name="start-up-check", daemon=True).start()
    while not stop.requested:
        time.sleep(0.2)
    server.stop(grace=None)
    pool.stop_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
