"""The engine's error model: who owns each failure (a record, a batch, the run, the worker process) and what
follows. Each test here reproduces one defect of issue 9 on the CPU, with fake models, fences and allocators."""

import asyncio
import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch

from beam_infer.config import EngineConfig
from beam_infer.engine import Engine, EngineError, EngineFatalError
from beam_infer.engine import run as run_module
from beam_infer.engine.errors import FATAL_EXIT_CODE
from beam_infer.engine.pinned import BufferPool
from beam_infer.engine.run import Run
from tests.conftest import engine_threads
from tests.fakes import Doubler, number_task, read_number, run_all, safe, twice, write_numbers

pytestmark = pytest.mark.timeout(60)
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"
_JOIN_S = 20  # the longest a test waits for a thread that, with the defect, would block for good


def make_engine(model=None, task=None, **config):
    config = {"device": "cpu", "max_batch_wait_s": 10.0, **config}
    return Engine(task or number_task(model), EngineConfig(**config)).retain()


def in_thread(fn, *args):
    """Runs fn(*args) in a thread joined for at most _JOIN_S: (finished, its result, the error it raised)."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(_JOIN_S)
    return not t.is_alive(), box.get("result"), box.get("error")


# ---- 1. a sticky device fault ends the worker; it is never bisected into dead letters ---------------------------

class _FaultFromCall(Doubler):
    """Raises `error` from its `first_bad` call on, as a sticky CUDA error does."""

    def __init__(self, first_bad=3, error=lambda: torch.AcceleratorError(ILLEGAL_ADDRESS)):
        super().__init__()
        self.calls = 0
        self.first_bad = first_bad
        self.error = error

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.first_bad:
            raise self.error()
        return super().forward(x)


@pytest.mark.parametrize("error", [lambda: torch.AcceleratorError(ILLEGAL_ADDRESS),
                                   lambda: RuntimeError("CUDA error: device-side assert triggered")],
                         ids=["AcceleratorError", "RuntimeError_before_torch_2_8"])
def test_a_device_fault_in_forward_fails_the_bundle_and_exits_the_worker_without_bisecting(process_exits, error):
    model = _FaultFromCall(error=error)
    engine = make_engine(model, batch_size=16, max_in_flight=64)
    bundle = engine.open_bundle()
    results = []
    with pytest.raises(EngineFatalError, match=r"device fault in forward of batch 2 \(16 records\)"):
        for r in write_numbers(safe(64)):
            bundle.submit(r)
            results += bundle.poll()
        results += list(bundle.drain())
    assert model.calls == 3  # no bisection: with it, 2 * 16 - 1 more calls on a broken device
    assert not [r for r in results if r.failure is not None]  # no innocent record blamed as a dead letter
    # The harness reports the failed bundle before it asks for the next one: the exit waits for that ask.
    assert not process_exits.called.is_set()
    with pytest.raises(EngineFatalError):
        engine.open_bundle()  # the worker is going away: no new bundle starts on it
    assert process_exits.called.wait(_JOIN_S) and process_exits.codes == [FATAL_EXIT_CODE]
    assert "device fault in forward of batch 2" in process_exits.messages[0]
    engine.release()


def test_after_a_device_fault_an_engine_released_and_retained_again_still_refuses_bundles(process_exits):
    engine = make_engine(_FaultFromCall(first_bad=1), batch_size=4)
    with pytest.raises(EngineFatalError):
        run_all(engine, write_numbers(safe(4)))
    engine.release()  # the failed DoFn's teardown
    engine.retain()  # a new DoFn instance's setup on the same worker
    with pytest.raises(EngineFatalError, match="device fault in forward"):
        engine.open_bundle()
    other = make_engine(batch_size=4)  # another model's engine in the same process: the device is the same
    with pytest.raises(EngineFatalError):
        other.open_bundle()
    assert process_exits.called.wait(_JOIN_S)
    engine.release()
    other.release()


def _cuda_fault_in(stage):
    def raise_fault(*args):
        raise torch.AcceleratorError(ILLEGAL_ADDRESS)
    return raise_fault


@pytest.mark.parametrize("stage", ["preprocess", "postprocess"])
def test_a_device_fault_in_a_record_stage_is_fatal_not_that_records_dead_letter(process_exits, stage):
    task = dataclasses.replace(number_task(), **{stage: _cuda_fault_in(stage)})
    engine = make_engine(task=task, batch_size=4)
    with pytest.raises(EngineFatalError, match=f"device fault in {stage}"):
        run_all(engine, write_numbers(safe(8)))
    with pytest.raises(EngineFatalError):
        engine.open_bundle()
    assert process_exits.called.wait(_JOIN_S) and process_exits.codes == [FATAL_EXIT_CODE]
    engine.release()


def test_after_a_device_fault_the_worker_process_exits_non_zero_with_a_clear_error():
    root = pathlib.Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.engine.fatal_worker", "fake"], capture_output=True,
                          text=True, timeout=50, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == FATAL_EXIT_CODE, done.stdout + done.stderr
    assert "bundle failed: " in done.stdout and "device fault in forward of batch 2" in done.stdout
    assert "still alive" not in done.stdout
    assert "exiting the worker process (code 70)" in done.stderr


# ---- 2. a failed run is replaced: a retried bundle succeeds on the same engine -----------------------------------

def _once_raising(fn, error):
    """A function that raises `error` the first time and calls `fn` after (set on a class, a method)."""
    raised = []

    def call(*args):
        if not raised:
            raised.append(error)
            raise error
        return fn(*args)
    return call


@pytest.mark.parametrize("fault", ["cancelled_fetch", "stage_bug"])
def test_after_a_run_fails_the_next_bundle_on_the_same_engine_gets_a_fresh_run_and_succeeds(monkeypatch, fault):
    if fault == "cancelled_fetch":  # a BaseException from fsspec's event loop, not a record's failure
        monkeypatch.setattr(run_module, "fetch_bytes", _once_raising(run_module.fetch_bytes, asyncio.CancelledError()))
    else:  # a bug in the batch thread's own code
        monkeypatch.setattr(Run, "_launch", _once_raising(Run._launch, RuntimeError("stage bug")))
    engine = make_engine(batch_size=4, max_batch_wait_s=0.05)
    engine.retain()  # a second holder: an idle DoFn instance of a multi-threaded SDK harness
    with pytest.raises(EngineError, match="fresh run"):
        run_all(engine, write_numbers(safe(8)))
    records = write_numbers(safe(12))
    retried = run_all(engine, records)  # Beam's retry of the bundle, on the same worker
    assert sorted(r.record["id"] for r in retried) == sorted(r["id"] for r in records)
    assert all(r.failure is None for r in retried)
    assert engine.runs_started == 2
    engine.release()
    engine.release()
    assert engine_threads() == []


def test_a_bundle_of_a_failed_run_raises_at_its_next_call_even_when_it_is_not_waiting(monkeypatch):
    monkeypatch.setattr(Run, "_launch", _once_raising(Run._launch, RuntimeError("stage bug")))
    engine = make_engine(batch_size=2, max_batch_wait_s=0.0)
    bundle = engine.open_bundle()
    for r in write_numbers(safe(2)):
        bundle.submit(r)
    with pytest.raises(EngineError, match="stage bug"):
        list(bundle.drain())
    with pytest.raises(EngineError, match="stage bug"):
        bundle.poll()
    engine.release()


# ---- 3. no buffer slot can leak; stopping cannot hang --------------------------------------------------------

class _Fence:
    """A CUDA event stand-in whose synchronize raises the first `failures` times."""

    def __init__(self, failures):
        self.failures = failures

    def synchronize(self):
        if self.failures:
            self.failures -= 1
            raise torch.AcceleratorError(ILLEGAL_ADDRESS)


def test_a_fence_that_raises_in_acquire_gives_the_slot_back_with_its_fence():
    pool = BufferPool(1, pin=False)
    pool.acquire((4,), torch.uint8).release(fence=_Fence(failures=2))
    for _ in range(2):
        with pytest.raises(torch.AcceleratorError):
            pool.acquire((4,), torch.uint8)
    finished, lease, _ = in_thread(pool.acquire, (4,), torch.uint8)  # with the slot leaked, blocks for good
    assert finished and lease.tensor.shape == (4,)


def test_an_allocation_that_fails_in_acquire_gives_the_slot_back(monkeypatch):
    pool = BufferPool(1, pin=False)
    monkeypatch.setattr(BufferPool, "_allocate", _once_raising(BufferPool._allocate, MemoryError("pinned memory")))
    with pytest.raises(MemoryError):
        pool.acquire((4,), torch.uint8)
    finished, lease, _ = in_thread(pool.acquire, (4,), torch.uint8)
    assert finished and lease.tensor.shape == (4,)


def test_a_lease_released_twice_goes_back_once_and_a_with_block_releases_it():
    pool = BufferPool(2, pin=False)
    lease = pool.acquire((4,), torch.uint8)
    lease.release()
    lease.release()
    with pool.acquire((4,), torch.uint8) as a, pool.acquire((4,), torch.uint8) as b:
        assert a.tensor.data_ptr() != b.tensor.data_ptr()  # a slot given back twice would be handed out twice
    finished, _, _ = in_thread(pool.acquire, (4,), torch.uint8)
    assert finished


def test_host_buffer_allocations_that_fail_fail_their_batches_and_the_engine_drains_the_rest(monkeypatch):
    failures = {"left": 3}

    def allocate(pool, nbytes):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("cannot pin memory (simulated)")
        return torch.empty(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(BufferPool, "_allocate", allocate)
    engine = make_engine(batch_size=2, host_buffers=2, max_in_flight=4, max_batch_wait_s=0.0)
    finished, out, error = in_thread(run_all, engine, write_numbers(safe(16)))
    assert finished and error is None  # with a slot leaked per failure, the drain blocked for good
    assert len(out) == 16
    assert sum(r.failure is not None and r.failure.stage == "collate" for r in out) >= 3
    engine.release()


class _Stuck(Doubler):
    """Blocks in its forward until `gate` is set; `entered` tells that a forward has started."""

    def __init__(self):
        super().__init__(gate=threading.Event())
        self.entered = threading.Event()
        self.calls_started = 0

    def forward(self, x):
        self.calls_started += 1
        self.entered.set()
        return super().forward(x)


def stuck_in_forward(records: int, stop_timeout_s: float = 0.5):
    """(model, engine, bundle): `records` submitted, the engine's forward thread blocked in the model."""
    model = _Stuck()
    engine = make_engine(model, batch_size=2, max_batch_wait_s=0.0, stop_timeout_s=stop_timeout_s)
    bundle = engine.open_bundle()
    for r in write_numbers(safe(records)):
        bundle.submit(r)
    assert model.entered.wait(_JOIN_S)
    return model, engine, bundle


def test_a_device_thread_that_does_not_stop_is_named_and_ends_the_worker_instead_of_hanging(process_exits):
    model, engine, bundle = stuck_in_forward(4)
    finished, _, _ = in_thread(engine.release)  # the forward thread is stuck in the model
    try:
        assert finished
        with pytest.raises(EngineFatalError, match=r"did not stop within 0.5s .*beam_infer-forward"):
            bundle.poll()
        with pytest.raises(EngineFatalError):
            engine.open_bundle()  # a new run would call the model beside the stuck one
        assert process_exits.called.wait(_JOIN_S) and process_exits.codes == [FATAL_EXIT_CODE]
    finally:
        model.gate.set()


def test_a_failed_run_whose_forward_will_not_stop_is_not_replaced_but_ends_the_worker(process_exits):
    model, engine, _ = stuck_in_forward(2)
    engine._run.fail(RuntimeError("stage bug"), "batch")
    try:
        with pytest.raises(EngineFatalError, match="beam_infer-forward"):
            engine.open_bundle()
        assert process_exits.called.wait(_JOIN_S) and process_exits.codes == [FATAL_EXIT_CODE]
        assert model.calls_started == 1  # never a second forward beside the stuck one
    finally:
        model.gate.set()
    engine.release()


def test_after_a_device_fault_stopping_does_not_wait_for_stuck_threads_and_hold_up_the_exit(process_exits):
    model, engine, bundle = stuck_in_forward(2, stop_timeout_s=3600.0)
    engine._run.fail(torch.AcceleratorError(ILLEGAL_ADDRESS), "postprocess")
    try:
        with pytest.raises(EngineFatalError):
            bundle.poll()
        finished, _, _ = in_thread(engine.release)  # the failed DoFn's teardown, before the harness reports
        assert finished  # it did not wait the hour for the stuck forward
        with pytest.raises(EngineFatalError):
            engine.open_bundle()
        assert process_exits.called.wait(_JOIN_S)
    finally:
        model.gate.set()


def test_stopping_a_busy_engine_skips_its_queued_batches_instead_of_calling_the_model_stuck(process_exits):
    from beam_infer.engine.health import process_fault

    model = Doubler(gate=threading.Event())  # busy (not stuck) in its forward until the gate opens
    engine = make_engine(model, batch_size=2, max_batch_wait_s=0.0, stop_timeout_s=5.0)
    bundle = engine.open_bundle()
    for r in write_numbers(safe(8)):
        bundle.submit(r)
    assert model.entered.wait(_JOIN_S)
    releasing = threading.Thread(target=engine.release)
    releasing.start()  # the last user leaves with batches queued behind the one in the model
    model.gate.set()
    releasing.join(_JOIN_S)
    assert not releasing.is_alive() and process_fault() is None
    assert len(model.batch_sizes) < 4  # the queued batches were dropped, not run one after another


def test_when_a_fresh_run_fails_to_start_the_next_bundle_starts_one(monkeypatch):
    engine = make_engine(batch_size=4)
    start_threads = Run._start_threads

    def start_then_fail(self, config):
        start_threads(self, config)
        raise RuntimeError("cannot start a thread (simulated)")

    engine._run.fail(RuntimeError("stage bug"), "batch")
    monkeypatch.setattr(Run, "_start_threads", start_then_fail)
    with pytest.raises(RuntimeError, match="cannot start a thread"):
        engine.open_bundle()
    monkeypatch.undo()
    records = write_numbers(safe(6))
    assert sorted(r.record["id"] for r in run_all(engine, records)) == sorted(r["id"] for r in records)
    engine.release()


def test_a_batch_drops_its_device_input_once_forward_and_d2h_are_queued(monkeypatch):
    seen = []
    unload = Run._unload

    def watching_unload(self, batch):
        seen.append(batch.device_input)
        unload(self, batch)

    monkeypatch.setattr(Run, "_unload", watching_unload)
    engine = make_engine(batch_size=4)
    assert len(run_all(engine, write_numbers(safe(16)))) == 16
    engine.release()
    assert seen and all(x is None for x in seen)


# ---- 4. inputs follow the model's dtype --------------------------------------------------------------------

class _Affine(torch.nn.Module):
    """A linear layer: its matmul refuses an input of another dtype than its weights. Records input dtypes."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        with torch.no_grad():
            self.linear.weight.fill_(2.0)
            self.linear.bias.zero_()
        self.dtypes = []

    def forward(self, x):
        self.dtypes.append(x.dtype)
        return self.linear(x.float() if not x.is_floating_point() else x)


def test_a_float32_preprocess_runs_on_a_bfloat16_model():
    model = _Affine()
    engine = make_engine(model, batch_size=4, dtype="bfloat16")
    out = run_all(engine, write_numbers([1.0, 2.5, 3.0, 100.0, 7.5]))
    engine.release()
    assert all(r.failure is None for r in out), [r.failure for r in out if r.failure]
    assert set(model.dtypes) == {torch.bfloat16}
    for r in out:
        assert r.value["doubled"] == pytest.approx(2 * r.record["value"], rel=1e-2)


def test_integer_inputs_reach_the_model_unconverted():
    model = _Affine()
    task = dataclasses.replace(number_task(model), preprocess=lambda data, r: read_number(data, r).astype(np.uint8))
    engine = make_engine(task=task, batch_size=4, dtype="float32")
    out = run_all(engine, write_numbers([1.0, 2.0, 3.0]))
    engine.release()
    assert all(r.failure is None for r in out) and set(model.dtypes) == {torch.uint8}


# ---- 5. every stage's output is checked; an out-of-memory error in H2D halves the batch --------------------------

@pytest.mark.parametrize("returned, named", [(None, "NoneType"), ([1.0], "list"), ("text", "str")])
def test_a_postprocess_returning_no_mapping_is_that_records_dead_letter(returned, named):
    def postprocess(outputs, record):
        return returned if record["value"] == 101.0 else twice(outputs, record)

    engine = make_engine(task=dataclasses.replace(number_task(), postprocess=postprocess), batch_size=4)
    out = {r.record["value"]: r for r in run_all(engine, write_numbers(safe(4)))}
    engine.release()
    bad = out[101.0].failure
    assert bad is not None and bad.stage == "postprocess" and bad.error_type == "TypeError"
    assert f"postprocess must return a mapping of output fields, got {named}" in bad.message
    assert all(out[v].failure is None for v in (100.0, 102.0, 103.0))


def test_a_preprocess_returning_no_array_of_numbers_is_that_records_dead_letter():
    def preprocess(data, record):
        return None if record["id"] == "n1" else read_number(data, record)

    engine = make_engine(task=dataclasses.replace(number_task(), preprocess=preprocess), batch_size=3)
    out = {r.record["id"]: r for r in run_all(engine, write_numbers(safe(3)))}
    engine.release()
    assert out["n1"].failure.stage == "preprocess" and "array of numbers, got NoneType" in out["n1"].failure.message
    assert out["n0"].failure is None and out["n2"].failure is None


def _out_of_memory_above(rows, calls):
    to_device = Run._to_device

    def copy(self, host):
        calls.append(len(host))
        if len(host) > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated H2D)")
        return to_device(self, host)
    return copy


def test_an_out_of_memory_error_in_h2d_halves_the_batch_and_later_batches_go_in_parts_that_fit(monkeypatch):
    calls = []
    monkeypatch.setattr(Run, "_to_device", _out_of_memory_above(2, calls))
    model = Doubler()
    engine = make_engine(model, batch_size=8)
    first = run_all(engine, write_numbers(safe(8)))
    assert calls == [8, 4, 2, 2, 4, 2, 2]
    calls.clear()
    later = run_all(engine, write_numbers(safe(16)))
    engine.release()
    assert all(r.failure is None and r.value["doubled"] == 2 * r.record["value"] for r in first + later)
    assert calls == [2] * 8  # the limit learnt: no further out-of-memory errors
    assert model.batch_sizes == [2] * 12


class _HoldsActivations(Doubler):
    """Allocates an 'activation' in each call and runs out of memory above 2 rows; records, at the start of each
    call, how many activations of earlier (failed) calls are still alive."""

    def __init__(self):
        super().__init__()
        self.activations = []
        self.alive_at_call = []

    def forward(self, x):
        self.alive_at_call.append(sum(ref() is not None for ref in self.activations))
        return self._layer(x)

    def _layer(self, x):
        activation = torch.empty(1 << 16)
        self.activations.append(weakref.ref(activation))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x * self.scale


def test_the_halves_after_an_out_of_memory_error_run_with_the_failed_calls_memory_freed():
    model = _HoldsActivations()
    engine = make_engine(model, batch_size=8)
    out = run_all(engine, write_numbers(safe(8)))
    engine.release()
    assert all(r.failure is None for r in out)
    assert model.alive_at_call == [0] * 7  # a retry inside the except clause would keep the failed frames alive


class _OutOfMemoryAbove4(Doubler):
    def __init__(self):
        super().__init__()
        self.out_of_memory = 0

    def forward(self, x):
        if len(x) > 4:
            self.out_of_memory += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(x)


def test_an_out_of_memory_batch_holding_a_bad_record_still_lowers_the_row_limit():
    from tests.fakes import POISON_FORWARD

    model = _OutOfMemoryAbove4()
    engine = make_engine(model, batch_size=8)
    first = run_all(engine, write_numbers([*safe(7), POISON_FORWARD]))
    model.batch_sizes.clear()
    errors_in_first = model.out_of_memory
    later = run_all(engine, write_numbers(safe(16)))
    engine.release()
    assert [r.record["value"] for r in first if r.failure is not None] == [POISON_FORWARD]
    assert all(r.failure is None for r in later)
    assert model.out_of_memory == errors_in_first == 1  # no out-of-memory attempt at 8 for every later batch
    assert model.batch_sizes == [4, 4, 4, 4]


def test_one_odd_record_fails_in_collate_whatever_its_place_in_the_batch():
    def preprocess(data, record):
        array = read_number(data, record)
        return np.concatenate([array, array]) if record["id"] == "n0" else array

    engine = make_engine(task=dataclasses.replace(number_task(), preprocess=preprocess), batch_size=4)
    out = {r.record["id"]: r for r in run_all(engine, write_numbers(safe(4)))}
    engine.release()
    assert out["n0"].failure.stage == "collate"
    assert all(out[i].failure is None for i in ("n1", "n2", "n3"))


def test_a_preprocess_array_in_big_endian_order_is_taken_as_its_numbers():
    task = dataclasses.replace(number_task(), preprocess=lambda data, r: read_number(data, r).astype(">f4"))
    engine = make_engine(task=task, batch_size=4)
    out = run_all(engine, write_numbers(safe(4)))
    engine.release()
    assert sorted(r.value["doubled"] for r in out) == [2 * v for v in safe(4)]


def test_one_record_too_large_for_h2d_on_its_own_fails_in_h2d(monkeypatch):
    monkeypatch.setattr(Run, "_to_device", _out_of_memory_above(0, []))
    engine = make_engine(batch_size=2)
    out = run_all(engine, write_numbers(safe(2)))
    engine.release()
    assert [r.failure.stage for r in out] == ["h2d", "h2d"]
    assert out[0].failure.error_type == "OutOfMemoryError"


# ---- 6. config validation, a bounded trace -------------------------------------------------------------------

def test_max_in_flight_below_batch_size_is_refused():
    with pytest.raises(ValueError, match=r"max_in_flight \(8\) must be 0 \(automatic: four batches\) or at least "
                                         r"batch_size \(16\)"):
        EngineConfig(batch_size=16, max_in_flight=8)
    assert EngineConfig(batch_size=16, max_in_flight=16).in_flight_limit == 16


def test_the_trace_of_timed_events_is_a_bounded_ring():
    engine = Engine(number_task(), EngineConfig(device="cpu", trace_events=True))
    assert engine.trace.maxlen == 4096


def test_a_retain_that_fails_to_start_the_engine_does_not_count_its_user(monkeypatch):
    engine = Engine(number_task(), EngineConfig(device="cpu"))
    monkeypatch.setattr(Run, "_start_threads", _once_raising(Run._start_threads, RuntimeError("no threads left")))
    with pytest.raises(RuntimeError, match="no threads left"):
        engine.retain()  # the DoFn's setup fails: it will never release
    engine.retain()
    engine.release()
    assert not engine.running  # the only user that counts has released it
