"""Beam's worker pool for `--environment_type=EXTERNAL`, made to fail fast: `python -m beam_infer.worker_pool`.

On Flink and Spark an EXTERNAL environment asks a worker pool (a gRPC service, usually a sidecar beside each task
manager or executor) to start SDK worker processes. Beam's own pool
(`python -m apache_beam.runners.worker.worker_pool_main`) runs each worker with the first `python` on PATH; when
that interpreter lacks apache_beam, the worker dies at once and the runner waits for it to connect for ever (Flink:
the job hangs); when it lacks beam_infer or the job's model module, Spark waits 3 minutes per task attempt for the
worker's data channel and then fails without naming the module. This pool:

- runs the workers with its own interpreter (`--worker-python` to pick another);
- before it starts the first worker, checks that this interpreter imports Beam's SDK harness, beam_infer and every
  `--require` module, and otherwise answers the runner's StartWorker with the import error, so the task (and, after
  the runner's retries, the job) fails within seconds with `No module named '...'`;
- binds `--host` (default every interface, as Beam's pool; 127.0.0.1 for a local cluster);
- passes the workers' output to its own (Beam's pool pipes it and never reads it).

Usage (a sidecar beside each Flink task manager or Spark worker, then `--environment_config=HOST:50000`):

    python -m beam_infer.worker_pool --port 50000 --require my_models
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading

import grpc
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer, kill_process_gracefully
from apache_beam.utils import thread_pool_executor

_LOGGER = logging.getLogger(__name__)
HARNESS_MODULE = "apache_beam.runners.worker.sdk_worker"
_CHECK_TIMEOUT_S = 120.0  # importing torch and beam_infer on a cold disk; a hung import is an error too
_WORKER_MAIN = ("from apache_beam.runners.worker.sdk_worker import SdkHarness; "
                "SdkHarness({url!r}, worker_id={worker_id!r}, state_cache_size={state_cache_size}, "
                "data_buffer_time_limit_ms={data_buffer_time_limit_ms}).run()")


def import_error(python: str, modules: list[str]) -> str | None:
    """Why `python` cannot import every one of `modules` (the last line of its traceback), or None when it can."""
    code = "".join(f"import {m}\n" for m in modules)
    try:
        check = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if check.returncode == 0:
        return None
    lines = check.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {check.returncode}"


class CheckedWorkerPool(BeamFnExternalWorkerPoolServicer):
    """Beam's pool servicer, starting workers with `worker_python` once it imports `modules` (see the module doc).

    A failed check is repeated at the next StartWorker (a fixed environment needs no restart of the pool); a passed
    one is not.
    """

    def __init__(self, worker_python: str = sys.executable, modules: list[str] | None = None,
                 state_cache_size: int = 0, data_buffer_time_limit_ms: int = 0) -> None:
        super().__init__(use_process=True, state_cache_size=state_cache_size,
                         data_buffer_time_limit_ms=data_buffer_time_limit_ms)
        self.worker_python = worker_python
        self.modules = [HARNESS_MODULE, "beam_infer", *(modules or [])]
        self._checked = False
        self._check_lock = threading.Lock()

    def check(self) -> str | None:
        """The error that keeps this pool from starting workers, or None."""
        with self._check_lock:
            if self._checked:
                return None
            error = import_error(self.worker_python, self.modules)
            self._checked = error is None
            return error

    def StartWorker(self, request: beam_fn_api_pb2.StartWorkerRequest,
                    context) -> beam_fn_api_pb2.StartWorkerResponse:
        error = self.check()
        if error is not None:
            message = f"the worker pool's interpreter {self.worker_python} cannot run the job's SDK workers: {error}"
            _LOGGER.error("%s (worker %s not started)", message, request.worker_id)
            return beam_fn_api_pb2.StartWorkerResponse(error=message)
        command = [self.worker_python, "-c", _WORKER_MAIN.format(
            url=request.control_endpoint.url, worker_id=request.worker_id, state_cache_size=self._state_cache_size,
            data_buffer_time_limit_ms=self._data_buffer_time_limit_ms)]
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            return beam_fn_api_pb2.StartWorkerResponse(error=f"starting {self.worker_python} failed: {e}")
        self._worker_processes[request.worker_id] = process
        _LOGGER.info("started SDK worker %s as process %d", request.worker_id, process.pid)
        return beam_fn_api_pb2.StartWorkerResponse()

    def stop_workers(self) -> None:
        """Ends every SDK worker this pool started (SIGTERM, then SIGKILL after 10 s)."""
        for worker_id in list(self._worker_processes):
            process = self._worker_processes.pop(worker_id, None)
            if process is not None:
                kill_process_gracefully(process)


def serve(pool: CheckedWorkerPool, host: str, port: int) -> tuple[grpc.Server, int]:
    """Starts a gRPC server for `pool` on host:port (0: any free port); returns it and its port."""
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beam_infer.worker_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50000, help="port to listen on (default 50000, Beam's)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    parser.add_argument("--worker-python", default=sys.executable,
                        help="interpreter of the SDK workers (default: this one)")
    parser.add_argument("--require", action="append", default=[], metavar="MODULE",
                        help="a module the workers must import besides apache_beam and beam_infer, e.g. the one "
                             "holding --model (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    pool = CheckedWorkerPool(args.worker_python, args.require)
    error = pool.check()  # say it at start-up too, where the person who deploys the pool looks
    if error is not None:
        _LOGGER.error("the workers' interpreter %s cannot run the job: %s; every StartWorker will fail until it "
                      "can", args.worker_python, error)
    server, port = serve(pool, args.host, args.port)
    _LOGGER.info("beam_infer worker pool listening on %s:%d, workers run %s", args.host, port, args.worker_python)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=None)
    pool.stop_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
