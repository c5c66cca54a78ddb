import sys
import threading

import pytest
import torch

from beam_infer.config import EngineConfig
from beam_infer.engine import Engine, EngineError
from tests.conftest import engine_threads
from tests.fakes import (
    POISON_FORWARD,
    POISON_POSTPROCESS,
    POISON_PREPROCESS,
    Doubler,
    number_task,
    run_all,
    safe,
    write_numbers,
)

pytestmark = pytest.mark.timeout(60)


def make_engine(model=None, **config):
    return Engine(number_task(model), EngineConfig(device="cpu", **config)).retain()


def test_every_record_comes_back_once_with_its_value():
    engine = make_engine(batch_size=4)
    records = write_numbers(safe(30))
    out = run_all(engine, records)
    engine.release()
    assert sorted(r.record["id"] for r in out) == sorted(r["id"] for r in records)
    assert all(r.value["doubled"] == 2 * r.record["value"] for r in out)


class _Identity(torch.nn.Module):
    """Returns its input itself (a view of the engine's reused input buffer); `second_batch` is set once the
    second batch has been collated into that buffer and run."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0
        self.second_batch = threading.Event()

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            self.second_batch.set()
        return x


def test_an_output_that_is_the_input_itself_is_not_overwritten_by_the_next_batch():
    import dataclasses

    model = _Identity()
    task = number_task(model)

    def postprocess(outputs, record):  # reads the first batch's rows only after the second batch reused the buffer
        assert model.second_batch.wait(timeout=20)
        return task.postprocess(outputs, record)

    engine = Engine(dataclasses.replace(task, postprocess=postprocess),
                    EngineConfig(device="cpu", batch_size=2, host_buffers=1, postprocess_threads=1,
                                 max_in_flight=12, max_batch_wait_s=10.0)).retain()
    out = run_all(engine, write_numbers(safe(12)))
    engine.release()
    assert sorted((r.record["value"], r.value["doubled"]) for r in out) == [(v, v) for v in safe(12)]


def test_batches_fill_up_to_batch_size():
    model = Doubler()
    engine = make_engine(model, batch_size=8, max_batch_wait_s=10.0)
    run_all(engine, write_numbers(safe(32)))
    engine.release()
    assert sum(model.batch_sizes) == 32
    assert max(model.batch_sizes) == 8


def test_drain_flushes_a_partial_batch_without_waiting_for_max_wait():
    engine = make_engine(batch_size=64, max_batch_wait_s=3600.0)  # only the drain can flush these 5
    out = run_all(engine, write_numbers(safe(5)))
    engine.release()
    assert len(out) == 5


def test_a_record_failing_in_each_stage_becomes_its_own_failure_and_the_rest_go_on():
    values = [1, POISON_PREPROCESS, 2, POISON_FORWARD, 3, POISON_POSTPROCESS, 4]
    records = write_numbers(values) + [{"id": "missing", "uri": "memory://beam_infer_tests/none.bin", "value": 0}]
    engine = make_engine(batch_size=8)
    out = {r.record["id"]: r for r in run_all(engine, records)}
    engine.release()
    stages = {rid: (r.failure.stage if r.failure else None) for rid, r in out.items()}
    assert stages == {"n0": None, "n1": "preprocess", "n2": None, "n3": "forward", "n4": None,
                      "n5": "postprocess", "n6": None, "missing": "fetch"}
    assert out["n3"].failure.error_type == "ValueError" and "poisoned forward" in out["n3"].failure.message
    assert out["n4"].value == {"doubled": 6.0}


def test_forward_error_is_bisected_to_the_bad_record():
    model = Doubler()
    engine = make_engine(model, batch_size=8, max_batch_wait_s=10.0)
    out = run_all(engine, write_numbers([1, 2, 3, 4, POISON_FORWARD, 6, 8, 9]))
    engine.release()
    failed = [r.record["value"] for r in out if r.failure]
    assert failed == [POISON_FORWARD]
    assert len(model.batch_sizes) < 8 + 8  # bisection, not one forward per record after every failure


def test_a_record_of_another_shape_fails_in_collate():
    records = write_numbers([1, 2, 3])
    import fsspec
    fsspec.filesystem("memory").pipe(records[1]["uri"], b"\x00" * 8)  # two floats instead of one
    engine = make_engine(batch_size=3, max_batch_wait_s=10.0)
    out = {r.record["id"]: r for r in run_all(engine, records)}
    engine.release()
    assert out["n1"].failure.stage == "collate"
    assert out["n0"].value and out["n2"].value


def test_submit_blocks_when_the_engine_is_full():
    gate = threading.Event()
    engine = make_engine(Doubler(gate), batch_size=2, max_in_flight=4, max_batch_wait_s=0.0)
    bundle = engine.open_bundle()
    records = write_numbers(safe(6))
    submitted = []

    def feed():
        for r in records:
            bundle.submit(r)
            submitted.append(r)

    t = threading.Thread(target=feed)
    t.start()
    t.join(timeout=1.0)
    assert t.is_alive() and len(submitted) == 4  # blocked on the fifth: four in flight
    gate.set()
    t.join(timeout=30)
    assert len(submitted) == 6
    assert len(list(bundle.drain())) == 6
    engine.release()


def test_a_bug_in_a_stage_fails_the_bundle_instead_of_hanging_it(monkeypatch):
    from beam_infer.engine.run import Run

    engine = make_engine(batch_size=2)
    monkeypatch.setattr(Run, "_postprocess", lambda *a: (_ for _ in ()).throw(RuntimeError("stage bug")))
    bundle = engine.open_bundle()
    for r in write_numbers([1, 2]):
        bundle.submit(r)
    with pytest.raises(EngineError, match="stage bug"):
        list(bundle.drain())
    engine.release()


def test_release_by_the_last_user_stops_every_thread_and_retain_restarts_them():
    engine = make_engine(batch_size=4)
    engine.retain()
    run_all(engine, write_numbers(safe(8)))
    engine.release()
    assert engine.running and engine_threads()
    engine.release()
    assert not engine.running and engine_threads() == []
    engine.retain()
    assert len(run_all(engine, write_numbers(safe(3)))) == 3
    engine.release()
    assert engine_threads() == []


def test_the_last_release_with_records_still_in_flight_stops_without_deadlock():
    engine = make_engine(batch_size=4)
    bundle = engine.open_bundle()
    for r in write_numbers(safe(40)):
        bundle.submit(r)
    engine.release()  # no drain: stage threads are mid-work and must still be joinable
    assert not engine.running and engine_threads() == []


class _OutOfMemoryAbove2(Doubler):
    def __init__(self, error=lambda: torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")):
        super().__init__()
        self.out_of_memory = 0
        self.error = error

    def forward(self, x):
        if len(x) > 2:
            self.out_of_memory += 1
            raise self.error()
        return super().forward(x)


def _nvjpeg_out_of_memory():  # torchvision re-raises whatever nvJPEG's decode raised as a plain RuntimeError
    return RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_halves_the_batch_and_every_record_still_succeeds():
    model = _OutOfMemoryAbove2()
    engine = make_engine(model, batch_size=8, max_batch_wait_s=10.0)
    out = run_all(engine, write_numbers(safe(8)))
    engine.release()
    assert all(r.failure is None and r.value["doubled"] == 2 * r.record["value"] for r in out)
    assert model.batch_sizes == [2, 2, 2, 2]


@pytest.mark.parametrize("error", [None, _nvjpeg_out_of_memory], ids=["OutOfMemoryError", "nvjpeg_RuntimeError"])
def test_after_an_out_of_memory_later_batches_are_run_in_chunks_that_fit(error):
    model = _OutOfMemoryAbove2() if error is None else _OutOfMemoryAbove2(error)
    engine = make_engine(model, batch_size=8, max_batch_wait_s=10.0)
    first = run_all(engine, write_numbers(safe(8)))
    errors_in_first = model.out_of_memory
    later = run_all(engine, write_numbers(safe(24)))
    engine.release()
    assert all(r.failure is None for r in first + later)
    assert errors_in_first == 3  # 8 rows, then 4, then the other 4 (the limit is 2 from then on)
    assert model.out_of_memory == errors_in_first  # the later 3 batches went in chunks of 2 at once
    assert model.batch_sizes == [2] * 16


class _WrongBatchDim(Doubler):
    def forward(self, x):
        return x[:0]


def test_a_model_output_without_the_batch_dimension_fails_its_records_in_forward():
    engine = make_engine(_WrongBatchDim(), batch_size=4, max_batch_wait_s=10.0)
    out = run_all(engine, write_numbers(safe(4)))
    engine.release()
    assert [r.failure.stage for r in out] == ["forward"] * 4
    assert "first dimension" in out[0].failure.message


class _Ragged(torch.nn.Module):
    """Pads its output to the largest value in the batch: halves of a bisected batch cannot be joined again."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        if (x == POISON_FORWARD).any():
            raise ValueError("poisoned forward")
        return torch.zeros(len(x), int(x.max()) % 7 + 1)


def test_a_batch_level_error_fails_that_batchs_records_and_the_engine_goes_on():
    engine = make_engine(_Ragged(), batch_size=8, host_buffers=1, max_batch_wait_s=10.0)
    values = [100.0, 101.0, 102.0, POISON_FORWARD, 103.0, 104.0, 105.0, 106.0]  # one batch, bisected, ragged halves
    first = run_all(engine, write_numbers(values))
    second = run_all(engine, write_numbers([110.0] * 8))  # the single input buffer came back
    engine.release()
    assert len(first) == 8 and all(r.failure is not None and r.failure.stage == "forward" for r in first)
    assert len(second) == 8
    assert engine_threads() == []


def test_every_record_gives_back_exactly_its_one_slot_of_room_whatever_stage_it_failed_in():
    engine = make_engine(batch_size=4, max_in_flight=16)
    values = [*safe(20), POISON_PREPROCESS, POISON_FORWARD, POISON_POSTPROCESS, *safe(5)]
    records = write_numbers(values) + [{"id": "missing", "uri": "/no/such/file.bin", "value": 0.0}]
    out = run_all(engine, records)
    assert len(out) == len(records)
    assert engine._run._room.qsize() == 16  # not fewer (a leak: submit would block), not more (a record finished twice)
    engine.release()


@pytest.mark.parametrize("interval, expected", [(None, 0.001), (0.0, 0.005), (0.0007, 0.0007)])
def test_the_engine_sets_its_gil_switch_interval_and_zero_leaves_the_processs(monkeypatch, interval, expected):
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: monkeypatch.setattr(sys, "getswitchinterval", lambda: s))
    monkeypatch.setattr(sys, "getswitchinterval", lambda: 0.005)
    asked = {} if interval is None else {"gil_switch_interval_s": interval}
    Engine(number_task(), EngineConfig(device="cpu", **asked))
    assert sys.getswitchinterval() == expected


def test_a_negative_gil_switch_interval_is_refused():
    with pytest.raises(ValueError, match="gil_switch_interval_s must not be negative"):
        EngineConfig(gil_switch_interval_s=-1)


class _OutOfMemoryOnPoison(Doubler):
    def forward(self, x):
        self.batch_sizes.append(len(x))
        if (x == 13.0).any():  # one record whose own size is too much (a huge image, say)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, one record)")
        return x * self.scale


def test_an_out_of_memory_caused_by_one_record_fails_that_record_and_keeps_full_batches():
    model = _OutOfMemoryOnPoison()
    engine = make_engine(model, batch_size=8, max_batch_wait_s=10.0)
    first = run_all(engine, write_numbers([1.0, 2.0, 13.0, 4.0, 5.0, 6.0, 7.5, 8.0]))
    model.batch_sizes.clear()
    later = run_all(engine, write_numbers(safe(16)))
    engine.release()
    assert [r.record["value"] for r in first if r.failure is not None] == [13.0]
    assert all(r.failure is None for r in later)
    assert model.batch_sizes == [8, 8]  # no row limit was set by that one record


@pytest.mark.parametrize("device, threads", [("cuda", [1]), ("cpu", [])])
def test_on_cuda_the_process_gives_torchs_cpu_ops_one_thread_and_on_cpu_leaves_them(monkeypatch, device, threads):
    from beam_infer.engine import configure_process

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: None)
    configure_process(EngineConfig(), torch.device(device))
    assert calls == threads


def test_after_interrupt_all_a_release_does_not_wait_for_a_forward_in_progress(monkeypatch):
    import time

    from beam_infer.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "_interrupted", False)
    model = Doubler(gate=threading.Event())
    engine = make_engine(model, batch_size=2, max_batch_wait_s=0.01, stop_timeout_s=30.0)
    bundle = engine.open_bundle()
    for r in write_numbers(safe(2)):
        bundle.submit(r)
    assert model.entered.wait(10)
    engine_module.interrupt_all()  # as the command's signal handler does
    start = time.monotonic()
    engine.release()
    took = time.monotonic() - start
    with pytest.raises(EngineError, match="stopping on a signal"):
        engine.retain()  # no second run beside threads still inside the model
    model.gate.set()  # lets the forward end, so that no thread outlives the test
    deadline = time.monotonic() + 10
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert took < 1.0 and not engine.running  # not the blocked forward, nor stop_timeout_s
    assert engine_threads() == []
