"""Variable-length inputs (InferenceTask.pad_value): length bucketing, padding to each batch's own longest, and the
failures that belong to one record."""

import time

import numpy as np
import pytest
import torch
from torch import nn

from beam_infer.config import EngineConfig
from beam_infer.engine import Engine
from beam_infer.engine.batcher import padded_length
from beam_infer.task import InferenceTask
from tests.fakes import run_all

pytestmark = pytest.mark.timeout(60)
PAD = -1
POISON = 666  # the model raises for any batch that holds this value


class SumLengths(nn.Module):
    """Per row: the sum and count of its non-padding values, and the padded width it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.widths: list[tuple[int, int]] = []  # (rows, width) of each call

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.widths.append(tuple(ids.shape))
        if (ids == POISON).any():
            raise ValueError("poisoned forward")
        mask = ids != PAD
        width = torch.full((len(ids),), ids.shape[1])
        return (ids * mask).sum(1), mask.sum(1), width


def sequence_task(model: nn.Module) -> InferenceTask:
    return InferenceTask(
        name="sum-lengths", load_model=lambda: model,
        preprocess=lambda data, record: np.asarray(data, dtype=np.int32),
        postprocess=lambda rows, record: {"sum": int(rows[0]), "length": int(rows[1]), "width": int(rows[2])},
        pad_value=PAD, inline_field="seq")


def run(records, model=None, **config):
    model = model or SumLengths()
    engine = Engine(sequence_task(model), EngineConfig(device="cpu", **config)).retain()
    try:
        return {r.record["id"]: r for r in run_all(engine, records)}, model, engine
    finally:
        engine.release()


def sequences(n: int, seed: int = 0) -> list[dict]:
    lengths = np.clip(np.random.default_rng(seed).lognormal(np.log(40), 0.9, n), 1, 300).astype(int)
    return [{"id": f"s{i}", "seq": list(range(1, n_i + 1))} for i, n_i in enumerate(lengths)]


def test_each_record_comes_back_once_with_its_own_length_in_batches_padded_to_their_own_longest():
    records = sequences(600)
    out, model, _ = run(records, batch_size=32, bucket_batches=8, pad_multiple=8, max_batch_wait_s=5.0)
    assert sorted(out) == sorted(r["id"] for r in records)
    for r in records:
        n = len(r["seq"])
        value = out[r["id"]].value
        assert (value["length"], value["sum"]) == (n, n * (n + 1) // 2)  # padding is masked out
        assert value["width"] % 8 == 0 and value["width"] >= n
    padded = sum(rows * width for rows, width in model.widths)
    fifo = sum(len(chunk) * padded_length(max(len(r["seq"]) for r in chunk), 8)
               for chunk in (records[i:i + 32] for i in range(0, len(records), 32)))
    real = sum(len(r["seq"]) for r in records)
    assert padded / real < 0.6 * fifo / real  # bucketed: far less padding than batches in arrival order


def test_token_budget_bounds_the_padded_size_of_every_batch():
    records = sequences(300, seed=1)
    out, model, _ = run(records, batch_size=64, max_tokens=512, pad_multiple=8, max_batch_wait_s=5.0)
    assert len(out) == 300 and all(r.failure is None for r in out.values())
    assert all(rows * width <= 512 or rows == 1 for rows, width in model.widths)
    assert max(rows for rows, _ in model.widths) > 8  # short records still share a batch


def test_a_bundle_smaller_than_the_window_drains_without_waiting_for_the_age_bound():
    records = sequences(40)
    started = time.monotonic()
    out, _, engine = run(records, batch_size=16, bucket_batches=8, max_batch_wait_s=60.0)
    assert len(out) == 40 and time.monotonic() - started < 20
    assert engine.in_flight_limit == (8 + 8) * 16  # the automatic bound grows by the window


def test_a_record_shaped_unlike_the_batch_past_its_first_dimension_fails_alone_in_collate():
    records = sequences(20)
    records[3] = {"id": "odd", "seq": [[1, 2], [3, 4]]}  # 2-D where the others are 1-D
    out, _, _ = run(records, batch_size=32, max_batch_wait_s=5.0)
    failure = out["odd"].failure
    assert failure.stage == "collate" and "differs from the batch's" in failure.message
    assert all(r.failure is None for rid, r in out.items() if rid != "odd")


def test_a_record_that_fails_the_forward_is_found_by_bisection_and_the_others_come_back_right():
    records = sequences(50)
    records[7] = {"id": "poison", "seq": [1, POISON, 2]}
    out, _, _ = run(records, batch_size=16, max_batch_wait_s=5.0)
    assert out["poison"].failure.stage == "forward"
    for r in records:
        if r["id"] != "poison":
            assert out[r["id"]].value["length"] == len(r["seq"])


def test_missing_inline_field_and_non_numeric_inputs_are_dead_letters_of_preprocess():
    records = [*sequences(5), {"id": "none"}, {"id": "text", "seq": ["a", "b"]}]
    out, _, _ = run(records, batch_size=4, max_batch_wait_s=5.0)
    assert {rid for rid, r in out.items() if r.failure is None} == {f"s{i}" for i in range(5)}
    assert "neither a 'seq' field nor a 'uri'" in out["none"].failure.message
    assert out["text"].failure.error_type == "ValueError"  # the task's own int32 conversion
    assert {r.failure.stage for rid, r in out.items() if r.failure} == {"preprocess"}


def test_a_token_budget_needs_variable_length_inputs_and_padding_excludes_a_device_preprocess():
    from tests.fakes import number_task

    with pytest.raises(ValueError, match="max_tokens"):
        Engine(number_task(), EngineConfig(device="cpu", max_tokens=1024))
    with pytest.raises(ValueError, match="exclude each other"):
        InferenceTask(name="x", load_model=SumLengths, preprocess=lambda d, r: d, postprocess=lambda o, r: {},
                      pad_value=0, device_preprocess=lambda xs, device: xs[0])
    with pytest.raises(ValueError, match="pad_multiple"):
        EngineConfig(max_tokens=4, pad_multiple=8)


def test_a_record_comes_back_by_the_age_bound_while_another_bundle_keeps_records_coming():
    import threading

    model = SumLengths()
    engine = Engine(sequence_task(model), EngineConfig(device="cpu", batch_size=8, bucket_batches=64,
                                                       max_batch_wait_s=0.2)).retain()
    stop = threading.Event()

    def stream():  # a second bundle: records keep arriving and are never drained while the first one waits
        bundle = engine.open_bundle()
        i = 0
        while not stop.is_set():
            bundle.submit({"id": f"bg{i}", "seq": list(range(1, 60))})
            bundle.poll()
            i += 1
        list(bundle.drain())

    background = threading.Thread(target=stream, daemon=True)
    background.start()
    try:
        bundle = engine.open_bundle()
        bundle.submit({"id": "short", "seq": [1, 2, 3]})
        started, out = time.monotonic(), []
        while not out and time.monotonic() - started < 20:
            out = bundle.poll()
            time.sleep(0.01)
        assert [r.record["id"] for r in out] == ["short"] and time.monotonic() - started < 5
    finally:
        stop.set()
        background.join(30)
        engine.release()


def test_a_max_in_flight_below_the_window_narrows_the_window_instead_of_waiting_for_the_age_bound():
    records = sequences(200)
    started = time.monotonic()
    out, _, _ = run(records, batch_size=16, bucket_batches=8, max_in_flight=64, max_batch_wait_s=30.0)
    assert len(out) == 200 and time.monotonic() - started < 15


def test_a_pad_value_the_dtype_cannot_hold_fails_the_batch_in_collate_naming_it():
    task = InferenceTask(name="u8", load_model=SumLengths, pad_value=-1, inline_field="seq",
                         preprocess=lambda data, record: np.asarray(data, dtype=np.uint8),
                         postprocess=lambda rows, record: {})
    engine = Engine(task, EngineConfig(device="cpu", batch_size=4, max_batch_wait_s=5.0)).retain()
    try:
        out = run_all(engine, [{"id": f"r{i}", "seq": [1, 2, 3][:i + 1]} for i in range(3)])
    finally:
        engine.release()
    assert len(out) == 3
    assert all(r.failure.stage == "collate" and "pad_value -1 is not a uint8 value" in r.failure.message for r in out)
