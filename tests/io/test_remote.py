import threading
from collections import Counter

import aiohttp
import pytest

from beam_infer.io import remote
from beam_infer.io.remote import RemoteIO, RemoteIOError, RetryPolicy, is_transient, status_of
from tests.io import flaky_fs
from tests.io.flaky_fs import HttpError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def script():
    return flaky_fs.reset()


class _Client:
    """A RemoteIO whose callbacks land in thread-safe lists, with its counts and busy time kept."""

    def __init__(self, **kwargs):
        self.counts = Counter()
        self.busy = Counter()
        self.done = threading.Semaphore(0)
        self.results = {}
        settings = dict(concurrency=8, max_bytes=1 << 20, retry=RetryPolicy(attempts=4, backoff_s=0.001))
        settings.update(kwargs)
        self.errors = []
        self.io = RemoteIO(count=lambda name, n: self.counts.update({name: n}), on_error=self.errors.append,
                           busy=lambda stage, s: self.busy.update({stage: s}), **settings)

    def read(self, uri):
        def done(data, error):
            self.results[uri] = (data, error)
            self.done.release()
        self.io.read(uri, done)

    def write(self, uri, data):
        def done(error):
            self.results[uri] = error
            self.done.release()
        self.io.write(uri, data, done)

    def wait(self, n=1):
        for _ in range(n):
            assert self.done.acquire(timeout=10), "a remote request never called back"


@pytest.fixture
def client():
    clients = []

    def make(**kwargs):
        clients.append(_Client(**kwargs))
        return clients[-1]
    yield make
    for c in clients:
        c.io.close(5)


def test_async_fsspec_urls_are_served_and_sync_or_local_ones_are_not(script):
    assert remote.serves("flaky://b/x") and remote.serves("gs://b/x") and remote.serves("https://h/x")
    assert not remote.serves("memory://b/x") and not remote.serves("nosuchprotocol://b/x")


@pytest.mark.parametrize("error", [HttpError(503), HttpError(429), HttpError(408), HttpError(500),
                                   ConnectionResetError("reset by peer"), aiohttp.ServerDisconnectedError(),
                                   aiohttp.ClientPayloadError("truncated body"), TimeoutError()],
                         ids=lambda e: type(e).__name__ + str(getattr(e, "code", "")))
def test_a_transient_error_is_retried_and_counted_and_the_read_succeeds(script, client, error):
    script.objects["b/x"] = b"payload"
    script.steps["b/x"] = [error, error]
    c = client()
    c.read("flaky://b/x")
    c.wait()
    assert c.results["flaky://b/x"] == (b"payload", None)
    assert script.calls["b/x"] == 3
    assert c.counts == {"fetch_retries": 2}
    assert c.busy["fetch"] > 0


@pytest.mark.parametrize("error, status", [(FileNotFoundError("b/x"), 404), (PermissionError("b/x"), 403),
                                           (OSError("Forbidden: b/x\nno access"), 403),
                                           (ValueError("Bad Request: b/x\ninvalid"), 400), (HttpError(401), 401)])
def test_a_permanent_error_fails_at_once_with_its_status_in_the_message(script, client, error, status):
    script.objects["b/x"] = b"payload"
    script.steps["b/x"] = [error]
    c = client()
    c.read("flaky://b/x")
    c.wait()
    data, failure = c.results["flaky://b/x"]
    assert data is None and isinstance(failure, RemoteIOError)
    assert failure.status == status and failure.attempts == 1 and script.calls["b/x"] == 1
    assert f"GET flaky://b/x failed: HTTP {status}" in str(failure) and "not retried" in str(failure)
    assert failure.__cause__ is error
    assert c.counts == {"fetch_failures": 1}


def test_a_missing_object_is_a_404_without_retries(script, client):
    c = client()
    c.read("flaky://b/missing")
    c.wait()
    assert c.results["flaky://b/missing"][1].status == 404 and script.calls["b/missing"] == 1


def test_a_transient_error_on_every_attempt_fails_after_the_last_with_the_count(script, client):
    script.objects["b/x"] = b"payload"
    script.steps["b/x"] = [HttpError(503)] * 10
    c = client()
    c.read("flaky://b/x")
    c.wait()
    failure = c.results["flaky://b/x"][1]
    assert failure.status == 503 and failure.attempts == 4 and "after 4 attempt(s)" in str(failure)
    assert script.calls["b/x"] == 4 and c.counts == {"fetch_retries": 3, "fetch_failures": 1}


def test_an_attempt_that_outlives_the_timeout_is_abandoned_and_retried(script, client):
    script.objects["b/x"] = b"payload"
    script.steps["b/x"] = [5.0]  # the first attempt would take 5 s
    c = client(retry=RetryPolicy(attempts=3, backoff_s=0.001, timeout_s=0.2))
    c.read("flaky://b/x")
    c.wait()
    assert c.results["flaky://b/x"] == (b"payload", None) and c.counts == {"fetch_retries": 1}


def test_no_more_than_the_concurrency_requests_are_in_flight(script, client):
    for i in range(40):
        script.objects[f"b/{i}"] = b"x"
        script.steps[f"b/{i}"] = [0.02]
    c = client(concurrency=5)
    for i in range(40):
        c.read(f"flaky://b/{i}")
    c.wait(40)
    assert script.most_in_flight == 5


def test_reads_wait_while_the_bytes_held_reach_the_bound_and_go_on_once_released(script, client):
    for i in range(6):
        script.objects[f"b/{i}"] = b"0123456789"  # 10 bytes each
    c = client(concurrency=1, max_bytes=25)  # one at a time: the bound stops the 4th read (30 bytes held)
    for i in range(6):
        c.read(f"flaky://b/{i}")
    c.wait(3)
    assert not c.done.acquire(timeout=0.3), "a read started while the bytes held were at the bound"
    assert len(c.results) == 3
    c.io.release(30)  # nothing held: room for three more
    c.wait(3)
    assert len(c.results) == 6


def test_a_write_is_retried_on_a_transient_error_and_a_permanent_one_is_not(script, client):
    script.steps["b/ok"] = [HttpError(503)]
    script.steps["b/denied"] = [PermissionError("b/denied")]
    c = client()
    c.write("flaky://b/ok", b"abc")
    c.write("flaky://b/denied", b"abc")
    c.wait(2)
    assert c.results["flaky://b/ok"] is None and script.objects["b/ok"] == b"abc"
    failure = c.results["flaky://b/denied"]
    assert isinstance(failure, RemoteIOError) and failure.status == 403 and "PUT flaky://b/denied" in str(failure)
    assert "b/denied" not in script.objects
    assert c.counts == {"put_retries": 1, "put_failures": 1}


def test_close_cancels_requests_in_flight_without_calling_back_and_ends_its_thread(script, client):
    script.objects["b/x"] = b"x"
    script.gate = threading.Event()  # never set: the request hangs
    c = client()
    c.read("flaky://b/x")
    assert c.io.close(5)
    assert c.results == {}
    assert not any(t.name == "beam_infer-remote" and t.is_alive() for t in threading.enumerate()
                   if t is c.io._thread)


def test_errors_are_sorted_by_the_status_they_carry():
    assert status_of(HttpError(503)) == 503 and is_transient(HttpError(503))
    assert status_of(aiohttp.ClientResponseError(None, (), status=429)) == 429
    assert is_transient(aiohttp.ClientResponseError(None, (), status=502))
    assert not is_transient(aiohttp.ClientResponseError(None, (), status=404))
    assert not is_transient(ValueError("not a remote error")) and status_of(ValueError("x")) is None
    assert not is_transient(RuntimeError("CUDA error: an illegal memory access"))


@pytest.mark.parametrize("error", [HttpError(401), ValueError("401 Invalid Credentials")])
def test_only_a_401_for_a_token_that_failed_to_refresh_is_retried(error):
    assert not is_transient(error)
    expired = HttpError(401)
    expired.args = ("Invalid Credentials, 401",)
    assert is_transient(expired)


def test_s3fs_translations_of_503_and_500_are_transient_and_other_os_errors_are_not():
    import errno

    assert is_transient(OSError(errno.EBUSY, "SlowDown")) and is_transient(OSError(errno.EREMOTEIO, "500"))
    assert not is_transient(OSError(errno.EIO, "unknown"))


def test_a_filesystem_that_fails_to_load_is_not_served_and_does_not_raise(monkeypatch):
    import fsspec

    def broken(protocol):
        raise TypeError("Descriptors cannot be created directly")  # a protobuf mismatch, say
    monkeypatch.setattr(fsspec, "get_filesystem_class", broken)
    monkeypatch.setattr(remote, "_ASYNC_PROTOCOLS", {})
    assert not remote.serves("brokenproto://b/x")


def test_a_callback_that_raises_is_reported_not_swallowed(script, client):
    script.objects["b/x"] = b"x"
    c = client()
    reported = threading.Event()
    c.io._on_error = lambda e: (c.errors.append(e), reported.set())
    c.io.read("flaky://b/x", lambda data, error: 1 / 0)
    assert reported.wait(10) and isinstance(c.errors[0], ZeroDivisionError)


def test_after_close_reads_writes_and_releases_do_nothing_and_raise_nothing(script, client):
    c = client(max_bytes=1)
    assert c.io.close(5)
    c.read("flaky://b/x")
    c.write("flaky://b/y", b"y")
    c.io.release(10)
    assert not c.done.acquire(timeout=0.2) and script.calls == {}


def test_a_loop_blocked_by_a_synchronous_call_still_ends_once_it_returns(script, client):
    script.objects["b/x"] = b"x"
    script.steps["b/x"] = [flaky_fs.Block(0.5)]
    c = client()
    c.read("flaky://b/x")
    c.io.begin_close()  # returns at once
    assert c.io.join(10)


def test_a_client_that_takes_too_long_to_build_fails_the_request_and_does_not_hold_up_close(script, client,
                                                                                          monkeypatch):
    built = threading.Event()

    def slow_credentials(*args):
        built.wait(5)  # a credential look-up waiting on an unreachable metadata server
        raise AssertionError("not reached in time")
    monkeypatch.setattr(remote, "open_async_filesystem", slow_credentials)
    c = client(retry=RetryPolicy(attempts=2, backoff_s=0.001, timeout_s=0.3))
    c.read("flaky://b/x")
    c.wait()
    failure = c.results["flaky://b/x"][1]
    assert isinstance(failure, RemoteIOError) and "no client" in str(failure)
    assert c.counts == {"fetch_failures": 1}
    assert c.io.close(2), "closing does not wait for the construction still running in its thread"
    built.set()
