"""The engine's telemetry: a header and samples of running totals in the launcher's folder, the last one written
when a run stops, nothing where the folder does not exist."""

import json
import os
import threading

import pytest

from beam_infer import EngineConfig
from beam_infer.engine.engine import Engine
from beam_infer.monitor import read_logs
from tests.conftest import engine_threads
from tests.fakes import POISON_PREPROCESS, number_task, run_all, safe, write_numbers

pytestmark = pytest.mark.timeout(60)


def lines(directory) -> list[dict]:
    (name,) = os.listdir(directory)
    with open(os.path.join(directory, name)) as f:
        return [json.loads(line) for line in f]


def test_engine_writes_header_and_running_totals_with_the_last_sample_at_stop(tmp_path):
    engine = Engine(number_task(), EngineConfig(device="cpu", batch_size=16, telemetry_dir=str(tmp_path),
                                                telemetry_interval_s=60))
    engine.retain()
    results = run_all(engine, write_numbers(safe(100) + [POISON_PREPROCESS]))
    engine.release()  # the run stops: a sample at once, though the interval is a minute
    header, *samples = lines(tmp_path)
    assert header["header"] and header["pid"] == os.getpid() and header["device"] == "cpu"
    assert header["threads"]["decode"] == engine.config.decode_pool_size and header["in_flight_limit"] == 64
    last = samples[-1]
    assert len(results) == 101 and last["records"] == 101 and last["dead_letters"] == 1
    assert sum(int(size) * n for size, n in last["batch_sizes"].items()) == 100
    assert last["busy"]["preprocess"] > 0 and last["busy"]["forward"] > 0
    engine.close()


def test_samples_show_records_in_flight_while_a_forward_is_held(tmp_path):
    from tests.fakes import Doubler

    gate = threading.Event()
    model = Doubler(gate=gate)
    engine = Engine(number_task(model), EngineConfig(device="cpu", batch_size=8, telemetry_dir=str(tmp_path),
                                                     telemetry_interval_s=0.05, max_batch_wait_s=0.01))
    engine.retain()
    bundle = engine.open_bundle()
    for record in write_numbers(safe(20)):
        bundle.submit(record)
    assert model.entered.wait(10)
    try:
        pause = threading.Event()
        for _ in range(200):  # the sampler's next lines see the held records
            logs = read_logs(str(tmp_path))
            queues = logs[0].samples[-1].get("queues") if logs else None
            if queues and queues["in_flight"] == 20:
                break
            pause.wait(0.05)
        assert queues["in_flight"] == 20 and queues["upstream"] == 0
    finally:
        gate.set()
    assert len(list(bundle.drain())) == 20
    engine.release()
    engine.close()


def test_no_telemetry_where_the_folder_does_not_exist(tmp_path):
    missing = tmp_path / "elsewhere"  # a remote worker: the launcher's folder is not there
    engine = Engine(number_task(), EngineConfig(device="cpu", telemetry_dir=str(missing)))
    engine.retain()
    run_all(engine, write_numbers(safe(5)))
    engine.release()
    assert not missing.exists() and engine._sampler is None
    engine.close()


def test_the_sampler_thread_runs_only_while_the_engine_has_a_run(tmp_path):
    engine = Engine(number_task(), EngineConfig(device="cpu", telemetry_dir=str(tmp_path), telemetry_interval_s=0.02))
    assert "beam_infer-telemetry" not in engine_threads()  # no run yet: the header only
    engine.retain()
    assert "beam_infer-telemetry" in engine_threads()
    run_all(engine, write_numbers(safe(5)))
    engine.release()  # no thread outlives the pipeline
    assert "beam_infer-telemetry" not in engine_threads()
    assert lines(tmp_path)[-1]["records"] == 5
    engine.close()

