"""beam_infer.monitor: rates, busy fractions, the bottleneck and the verdict, from engines' telemetry."""

import json

import pytest

from beam_infer import monitor
from beam_infer.monitor import INPUT, EngineLog, TelemetryReader

pytestmark = pytest.mark.timeout(30)
THREADS = {"decode": 4, "fetch": 16, "remote": 256, "postprocess": 2}


def engine_log(seconds: int, per_s: float, busy_per_s: dict[str, float], in_flight: int, t0: float = 1000.0,
               limit: int = 256, device: str = "cpu", remote: bool = False, **gauges) -> EngineLog:
    """An engine alive from t0 for `seconds`, finishing `per_s` records a second, its stages busy as given."""
    header = {"header": True, "t": t0, "threads": THREADS, "in_flight_limit": limit, "interval_s": 1.0,
              "device": device, "dtype": "float32"}
    samples = [{"t": t0 + i, "records": per_s * i, "dead_letters": i // 2,
                "busy": {stage: s * i for stage, s in busy_per_s.items()},
                "queues": {"in_flight": in_flight, "ready": 3, "remote": remote}, **gauges}
               for i in range(1, seconds + 1)]
    return EngineLog(header, samples)


def test_rate_and_busy_fractions_are_growth_over_capacity_summed_over_engines():
    a = engine_log(10, 100, {"preprocess": 2.0, "fetch": 0.4, "forward": 0.5}, in_flight=200)
    b = engine_log(10, 50, {"preprocess": 1.0, "forward": 0.25}, in_flight=100)
    w = monitor.window([a, b], 1002.0, 1006.0)
    assert w.rate == pytest.approx(150)
    assert w.busy["decode"] == pytest.approx((2.0 + 1.0) / 8)  # 4 decode threads each
    assert w.busy["fetch"] == pytest.approx(0.4 / 8)  # local reads run in the decode pool
    assert w.busy["forward"] == pytest.approx(0.75 / 2)
    assert w.fill == pytest.approx(300 / 512)
    assert w.queues["ready"] == 6


def test_totals_are_linear_between_samples_and_flat_after_the_last():
    log = engine_log(4, 100, {}, in_flight=0)
    assert log.total(1001.5, "records") == pytest.approx(150)
    assert log.total(999.0, "records") == 0
    assert log.total(2000.0, "records") == 400


def test_a_saturated_decode_pool_is_the_bottleneck():
    log = engine_log(10, 100, {"preprocess": 3.8, "forward": 0.3}, in_flight=250)
    whole = monitor.window([log], 1000.0, 1010.0)
    assert whole.bottleneck() == "decode"
    text = monitor.verdict(whole, "cpu")
    assert "busy 30%" in text and "waiting on decode" in text and "busy 95%" in text


def test_an_engine_that_is_not_kept_full_waits_for_input():
    log = engine_log(10, 100, {"preprocess": 1.0, "forward": 0.3}, in_flight=20)
    whole = monitor.window([log], 1000.0, 1010.0)
    assert whole.bottleneck() == INPUT
    assert "waiting for input" in monitor.verdict(whole, "cpu")


def test_gpu_utilisation_stands_for_the_forward_on_cuda():
    log = engine_log(10, 100, {"preprocess": 0.4, "forward": 0.05}, in_flight=250, gpu_util=95, gpu_mem=2**30)
    whole = monitor.window([log], 1000.0, 1010.0)
    assert whole.bottleneck() == "forward"
    assert "The GPU was busy 95% of the time (by NVML)" in monitor.verdict(whole, "cuda:0")
    assert whole.gpu_mem == 2**30


def test_timeline_has_at_most_the_points_asked_for():
    log = engine_log(100, 10, {"forward": 0.5}, in_flight=100)
    points = monitor.timeline([log], 1000.0, 1100.0, points=20)
    assert len(points) == 20 and points[0].t0 == 1000.0 and points[-1].t1 == pytest.approx(1100.0)
    assert sum(p.records for p in points) == pytest.approx(1000)


def test_reader_parses_only_complete_lines_and_picks_up_where_it_left(tmp_path):
    path = tmp_path / "engine-1-a.jsonl"
    header = {"header": True, "t": 1.0, "threads": THREADS, "in_flight_limit": 8, "interval_s": 1.0}
    path.write_text(json.dumps(header) + "\n" + json.dumps({"t": 2.0, "records": 5}) + "\n" + '{"t": 3.0, "rec')
    reader = TelemetryReader(str(tmp_path))
    (log,) = reader.read()
    assert log.samples[-1]["records"] == 5
    with open(path, "a") as f:
        f.write('ords": 9}\n')
    (log,) = reader.read()
    assert [s["records"] for s in log.samples] == [0, 5, 9]
    assert monitor.totals([log]) == {"records": 9, "dead_letters": 0}


def test_on_cuda_the_d2h_wait_counts_as_device_time_not_as_a_bottleneck_of_its_own():
    # The forward's host time is its kernel launches; the unload thread waits for the device's work.
    log = engine_log(10, 100, {"preprocess": 0.4, "forward": 0.05, "d2h": 0.9}, in_flight=250, device="cuda:0")
    whole = monitor.window([log], 1000.0, 1010.0)
    assert "d2h" not in whole.load() and whole.load()["forward"] == pytest.approx(0.95)
    assert whole.bottleneck() == "forward"
    assert "the forward's and the D2H wait's host time" in monitor.verdict(whole, "cuda:0")


def test_gpu_utilisation_is_the_windows_mean_not_its_peak():
    log = engine_log(20, 100, {"forward": 0.01}, in_flight=250, device="cuda:0")
    for i, sample in enumerate(log.samples[1:]):
        sample["gpu_util"] = 100 if i == 0 else 0
    assert monitor.window([log], 1000.0, 1021.0).gpu_util == pytest.approx(5)


def test_remote_reads_are_their_own_pool_not_the_decode_pools():
    log = engine_log(10, 100, {"fetch": 0.6 * 256, "preprocess": 0.4 * 4, "forward": 0.2}, in_flight=250,
                     remote=True)
    log.extend([{**log.samples[-1], "t": 1010.5, "queues": {}}])  # the last sample, of a stopped run
    load = monitor.window([log], 1000.0, 1010.0).load()
    assert load["fetch"] == pytest.approx(0.6) and load["decode"] == pytest.approx(0.4)
    assert monitor.window([log], 1000.0, 1010.0).bottleneck() == "fetch"


def test_an_empty_window_names_no_bottleneck():
    log = engine_log(10, 100, {"forward": 0.5}, in_flight=250)
    assert monitor.window([log], 1005.0, 1005.0).bottleneck() is None
