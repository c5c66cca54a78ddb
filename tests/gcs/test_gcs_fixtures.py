"""The gs:// test infrastructure itself: fake-gcs-server, the FaultProxy in front of it, and the `gcs` fixture."""

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings

import aiohttp
import pytest

from tests.gcs.proxy import FaultProxy, add_batch_content_ids
from tests.gcs.server import GcsServer


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _object_url(gcs, name: str) -> str:
    return f"{gcs.proxy.url}/download/storage/v1/b/{gcs.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"


@pytest.mark.timeout(30)
def test_gcsfs_round_trips_bytes_through_the_proxy(gcs):
    import fsspec

    gcs.upload("in/a b%2F.bin", b"seeded")  # a space and a literal %2F: names are quoted as one path segment
    fs = fsspec.filesystem("gs")
    assert fs.cat_file(gcs.url_of("in/a b%2F.bin")) == b"seeded"
    fs.pipe_file(gcs.url_of("out/b.bin"), b"written" * 1000)
    assert gcs.download("out/b.bin") == b"written" * 1000
    assert gcs.list("out/") == ["out/b.bin"]
    assert gcs.proxy.counts["requests"] >= 2  # gcsfs went through the proxy, not to the server


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fault", "status", "reason"), [("error_503", 503, "backendError"),
                                                         ("error_429", 429, "rateLimitExceeded")])
def test_error_faults_answer_a_gcs_json_error_without_forwarding(gcs, fault, status, reason):
    gcs.upload("x", b"data")
    gcs.proxy.configure(**{fault: 1.0})
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as raised:
            _get(_object_url(gcs, "x"))
        assert raised.value.code == status
        error = json.loads(raised.value.read())["error"]
        assert error["code"] == status and error["errors"][0]["reason"] == reason
    assert gcs.proxy.counts == {"requests": 3, "error_503": 0, "error_429": 0, "drop": 0, "slow_body": 0,
                                fault: 3}


@pytest.mark.timeout(30)
def test_drop_fault_closes_the_connection_without_a_response(gcs):
    gcs.upload("x", b"data")
    gcs.proxy.configure(drop=1.0)
    with pytest.raises(ConnectionResetError):  # http.client.RemoteDisconnected is one
        _get(_object_url(gcs, "x"))
    assert gcs.proxy.counts["drop"] == 1
    gcs.proxy.configure(drop=0.0)
    assert _get(_object_url(gcs, "x")) == b"data"  # the proxy itself carries on


@pytest.mark.timeout(30)
def test_latency_delays_each_request_by_at_least_latency_s(gcs):
    gcs.upload("x", b"data")
    gcs.proxy.configure(latency_s=0.3)
    for _ in range(2):
        start = time.monotonic()
        assert _get(_object_url(gcs, "x")) == b"data"
        assert time.monotonic() - start >= 0.3


@pytest.mark.timeout(30)
def test_slow_body_sends_the_first_bytes_then_pauses_before_the_rest(gcs):
    data = os.urandom(100_000)
    gcs.upload("x", data)
    gcs.proxy.configure(slow_body=1.0, slow_body_s=0.4)

    async def read_timed() -> tuple[float, float, bytes]:
        async with aiohttp.ClientSession() as session, session.get(_object_url(gcs, "x")) as response:
            start = time.monotonic()
            first = await response.content.readany()
            first_at = time.monotonic() - start
            rest = await response.read()
            return first_at, time.monotonic() - start, first + rest

    first_at, done_at, body = asyncio.run(read_timed())
    assert body == data
    assert done_at - first_at >= 0.3  # the pause came after the first part, not before the headers
    assert gcs.proxy.counts["slow_body"] == 1


@pytest.mark.timeout(30)
def test_fault_draws_repeat_with_the_same_seed(gcs):
    gcs.upload("x", b"data")

    def outcomes() -> list[bool]:
        results = []
        for _ in range(20):
            try:
                _get(_object_url(gcs, "x"))
                results.append(True)
            except urllib.error.HTTPError:
                results.append(False)
        return results

    gcs.proxy.configure(error_503=0.5, seed=7)
    first = outcomes()
    gcs.proxy.configure(seed=7)
    assert outcomes() == first and not all(first) and any(first)


@pytest.mark.timeout(30)
def test_configure_rejects_rates_that_add_up_to_more_than_one(gcs):
    with pytest.raises(ValueError, match="at most 1"):
        gcs.proxy.configure(error_503=0.6, drop=0.6)
    with pytest.raises(ValueError):
        gcs.proxy.configure(latency_s=-1)
    gcs.proxy.configure(error_503=0.6, drop=0.4)


@pytest.mark.timeout(30)
def test_proxy_serves_hundreds_of_concurrent_requests(gcs):
    gcs.upload("x", b"y" * 10_000)
    gcs.proxy.configure(latency_s=0.05)

    async def fetch_all() -> list[tuple[int, int]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one() -> tuple[int, int]:
                async with session.get(_object_url(gcs, "x")) as response:
                    return response.status, len(await response.read())
            return await asyncio.gather(*(one() for _ in range(400)))

    assert set(asyncio.run(fetch_all())) == {(200, 10_000)}
    assert gcs.proxy.counts["requests"] == 400


@pytest.mark.timeout(30)
def test_beam_style_batch_requests_work_through_the_proxy(gcs):
    """google-cloud-storage batches (what Beam's gs:// rename and delete send) need the Content-IDs the proxy
    adds: fake-gcs-server skips parts without one."""
    from google.cloud import storage

    for name in ("a", "b"):
        gcs.upload(name, b"data")
    client = storage.Client.create_anonymous_client()  # STORAGE_EMULATOR_HOST: the proxy
    bucket = client.bucket(gcs.bucket)
    with client.batch():
        bucket.copy_blob(bucket.blob("a"), bucket, "c")
        bucket.delete_blob("b")
    assert gcs.list() == ["a", "c"]


def test_batch_content_ids_are_added_only_where_missing():
    body = (b'--XyZ\nContent-Type: application/http\n\nDELETE /a HTTP/1.1\n\n'
            b'--XyZ\nContent-ID: <own>\nContent-Type: application/http\n\nDELETE /b HTTP/1.1\n\n--XyZ--\n')
    fixed = add_batch_content_ids(body, 'multipart/mixed; boundary="XyZ"')
    assert fixed == body.replace(b"--XyZ\nContent-Type", b"--XyZ\nContent-ID: <1>\nContent-Type", 1)


@pytest.mark.timeout(30)
def test_server_process_is_reaped_after_stop():
    with GcsServer() as server:
        pid = server.process.pid
        assert _get(f"{server.url}/storage/v1/b")
    assert server.process is None
    with pytest.raises(ProcessLookupError):  # reaped: not even a zombie is left
        os.kill(pid, 0)


@pytest.mark.timeout(30)
def test_proxy_stop_leaves_no_thread_and_no_unclosed_session(gcs_server, caplog):
    gc.collect()  # what earlier tests left for the collector warns now, not inside the block below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FaultProxy(gcs_server.url) as proxy:
            assert _get(f"{proxy.url}/storage/v1/b")
        gc.collect()
    assert not [t for t in threading.enumerate() if t.name == "gcs-fault-proxy"]
    assert not [str(w.message)[:300] for w in caught if issubclass(w.category, ResourceWarning)]
    assert "Unclosed" not in caplog.text


@pytest.mark.timeout(60)
def test_serve_command_prints_the_proxy_url_and_stops_on_sigterm():
    process = subprocess.Popen([sys.executable, "-m", "tests.gcs", "serve", "--latency-ms", "1", "--bucket",
                                "bench-bucket"], stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert json.loads(_get(f"{url}/storage/v1/b"))["items"][0]["name"] == "bench-bucket"
        process.terminate()
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()
