"""The engine's remote fetch and put stages, against a scripted async filesystem (flaky://)."""

import dataclasses
import os
import threading

import fsspec
import numpy as np
import pytest

from beam_infer import EngineConfig
from beam_infer.engine import Engine
from beam_infer.task import Blob
from tests.fakes import number_task, run_all
from tests.io import flaky_fs
from tests.io.flaky_fs import HttpError

pytestmark = pytest.mark.timeout(60)

CONFIG = EngineConfig(device="cpu", batch_size=4, io_backoff_s=0.001)


@pytest.fixture
def script():
    return flaky_fs.reset()


def _numbers(script, n):
    records = []
    for i in range(n):
        script.objects[f"in/{i}"] = np.array([100.0 + i], dtype=np.float32).tobytes()
        records.append({"id": f"n{i}", "uri": f"flaky://in/{i}", "value": 100.0 + i})
    return records


def _run(task, records, config=CONFIG):
    engine = Engine(task, config).retain()
    try:
        results = {r.record["id"]: r for r in run_all(engine, records)}
        busy, _, counts = engine.take_stats()
        held = engine._run._remote._held if engine._run._remote else 0
    finally:
        engine.release()
    return results, busy, counts, held


def test_remote_records_are_read_through_the_event_loop_with_transient_errors_retried(script):
    records = _numbers(script, 10)
    script.steps["in/3"] = [HttpError(503), ConnectionResetError()]
    script.steps["in/7"] = [HttpError(429)]
    results, busy, counts, held = _run(number_task(), records)
    assert {rid: r.value["doubled"] for rid, r in results.items()} == {f"n{i}": 2 * (100.0 + i) for i in range(10)}
    assert counts == {"fetch_retries": 3}
    assert busy["fetch"] > 0
    assert held == 0, "the bytes of every read are released once preprocessed"


def test_a_missing_remote_object_is_a_fetch_dead_letter_with_its_status_and_no_retry(script):
    records = _numbers(script, 3)
    records.append({"id": "gone", "uri": "flaky://in/gone", "value": 1.0})
    results, _, counts, _ = _run(number_task(), records)
    failure = results["gone"].failure
    assert failure.stage == "fetch" and failure.error_type == "RemoteIOError"
    assert "HTTP 404" in failure.message and "flaky://in/gone" in failure.message
    assert script.calls["in/gone"] == 1 and counts == {"fetch_failures": 1}
    assert all(results[f"n{i}"].value is not None for i in range(3))


class _PutOutput:
    """A postprocess returning its value as a Blob under `prefix`, plus a plain field."""

    def __init__(self, prefix):
        self.prefix = prefix

    def __call__(self, outputs, record):
        (row,) = outputs
        return {"output_uri": Blob(f"{self.prefix}/{record['id']}.bin", [b"v=", str(float(row[0])).encode()]),
                "doubled": float(row[0])}


def _put_task(prefix):
    return dataclasses.replace(number_task(), postprocess=_PutOutput(prefix))


def test_blobs_are_put_remotely_and_each_row_holds_its_uri(script):
    records = _numbers(script, 6)
    script.steps["out/n2.bin"] = [HttpError(503)]
    results, busy, counts, _ = _run(_put_task("flaky://out"), records)
    for i in range(6):
        value = results[f"n{i}"].value
        assert value["output_uri"] == f"flaky://out/n{i}.bin"
        assert script.objects[f"out/n{i}.bin"] == f"v={2 * (100.0 + i)}".encode()
    assert counts == {"put_retries": 1} and busy["put"] > 0


def test_a_put_that_fails_for_good_is_a_put_dead_letter_and_the_others_are_written(script):
    records = _numbers(script, 4)
    script.steps["out/n1.bin"] = [PermissionError("out/n1.bin")]
    results, _, counts, _ = _run(_put_task("flaky://out"), records)
    failure = results["n1"].failure
    assert results["n1"].value is None
    assert failure.stage == "put" and "HTTP 403" in failure.message and "PUT flaky://out/n1.bin" in failure.message
    assert counts == {"put_failures": 1}
    assert sorted(k for k in script.objects if k.startswith("out/")) == ["out/n0.bin", "out/n2.bin", "out/n3.bin"]


def test_local_blobs_are_written_whole_under_their_final_names_with_no_temporary_file_left(script, tmp_path):
    records = _numbers(script, 5)
    results, _, _, _ = _run(_put_task(str(tmp_path / "nested" / "out")), records)
    names = sorted(os.listdir(tmp_path / "nested" / "out"))
    assert names == [f"n{i}.bin" for i in range(5)]
    assert (tmp_path / "nested" / "out" / "n4.bin").read_bytes() == b"v=208.0"
    assert results["n4"].value["output_uri"] == str(tmp_path / "nested" / "out" / "n4.bin")


def test_a_local_write_that_fails_is_a_put_dead_letter(script, tmp_path):
    records = _numbers(script, 2)
    (tmp_path / "file").write_bytes(b"")  # a file where the output directory should be
    results, _, _, _ = _run(_put_task(str(tmp_path / "file")), records)
    assert {r.failure.stage for r in results.values()} == {"put"}
    assert os.listdir(tmp_path) == ["file"]


def test_a_blob_for_a_url_without_an_async_filesystem_is_written_with_fsspec(script):
    records = _numbers(script, 3)
    results, _, _, _ = _run(_put_task("memory://put_test"), records)
    fs = fsspec.filesystem("memory")
    assert fs.cat("memory://put_test/n2.bin") == b"v=204.0"
    assert results["n2"].value["output_uri"] == "memory://put_test/n2.bin"


def test_releasing_the_engine_with_remote_reads_hanging_ends_every_thread(script):
    records = _numbers(script, 3)
    script.gate = threading.Event()  # never set
    engine = Engine(number_task(), CONFIG).retain()
    bundle = engine.open_bundle()
    for r in records:
        bundle.submit(r)
    bundle.close()
    engine.release()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("beam_infer")]


def test_stopping_while_the_event_loop_is_blocked_does_not_take_the_device_threads_for_stuck(script,
                                                                                          process_exits):
    records = _numbers(script, 2)
    script.steps["in/0"] = [flaky_fs.Block(1.5)]  # a synchronous call in a client holds the loop past the stop timeout
    engine = Engine(number_task(), dataclasses.replace(CONFIG, stop_timeout_s=1.0)).retain()
    bundle = engine.open_bundle()
    for r in records:
        bundle.submit(r)
    bundle.close()
    engine.release()
    assert process_exits.codes == [], "the device threads stopped in time: no device fault"
    engine.retain()  # and the engine still starts a run
    engine.release()


def test_remote_io_that_cannot_start_fails_the_run_and_returns_the_records_room(script, monkeypatch):
    from beam_infer.engine.errors import EngineError
    from beam_infer.io import remote

    def no_thread(**kwargs):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(remote, "RemoteIO", no_thread)
    records = _numbers(script, 2)
    engine = Engine(number_task(), dataclasses.replace(CONFIG, batch_size=1, max_in_flight=1)).retain()
    try:
        bundle = engine.open_bundle()
        with pytest.raises(EngineError, match="can't start new thread"):
            bundle.submit(records[0])
        monkeypatch.undo()  # the next bundle gets a fresh run, whose room was not lost
        assert len(run_all(engine, records)) == 2
    finally:
        engine.release()


def test_http_urls_are_read_through_the_event_loop_with_a_503_retried(gcs):
    """fsspec's async http filesystem, through the fault proxy (the GCS server's media download URLs)."""
    for i in range(4):
        gcs.upload(f"in/{i}.bin", np.array([100.0 + i], dtype=np.float32).tobytes())
    base = f"{gcs.proxy.url}/download/storage/v1/b/{gcs.bucket}/o/in%2F"
    records = [{"id": f"n{i}", "uri": f"{base}{i}.bin?alt=media", "value": 100.0 + i} for i in range(4)]
    records.append({"id": "gone", "uri": f"{base}gone.bin?alt=media", "value": 0.0})
    gcs.proxy.configure(error_503=0.5, seed=0)  # seeded: the same draws, so the same 503s, in every run
    engine = Engine(number_task(), dataclasses.replace(CONFIG, io_attempts=30)).retain()
    try:
        results = {r.record["id"]: r for r in run_all(engine, records)}
        _, _, counts = engine.take_stats()
    finally:
        engine.release()
    assert {rid: r.value["doubled"] for rid, r in results.items() if rid != "gone"} == {
        f"n{i}": 2 * (100.0 + i) for i in range(4)}
    assert results["gone"].failure.stage == "fetch" and "HTTP 404" in results["gone"].failure.message
    assert counts["fetch_retries"] >= 1 and counts["fetch_failures"] == 1
