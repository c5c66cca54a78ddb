import numpy as np
import pytest

from beam_infer.engine.batcher import Batcher, LengthBatcher, padded_length

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_batch_is_returned_when_size_is_reached():
    b = Batcher(3, max_wait_s=1.0, clock=FakeClock())
    assert b.add("a") == []
    assert b.add("b") == []
    assert b.add("c") == [["a", "b", "c"]]
    assert len(b) == 0


def test_partial_batch_is_due_after_max_wait_of_its_oldest_item():
    clock = FakeClock()
    b = Batcher(10, max_wait_s=0.5, clock=clock)
    assert b.time_left() is None
    b.add(1)
    clock.now += 0.2
    b.add(2)
    assert b.time_left() == pytest.approx(0.3)
    clock.now += 0.4
    assert b.time_left() == 0.0
    assert b.take_due() == [[1, 2]]
    assert b.time_left() is None
    assert b.take_all() == []


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(0, 0.1)


def lengths_of(batches):
    return [[len(x) for x in batch] for batch in batches]


def test_padded_length_rounds_up_to_the_multiple_and_is_at_least_one_multiple():
    assert [padded_length(n, 8) for n in (0, 1, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 24]


def test_full_window_gives_a_batch_of_similar_lengths_holding_the_oldest_item():
    b = LengthBatcher(2, 10.0, len, window=6, clock=FakeClock())
    for text in ["aaaaaaaaaaaa", "b", "cccccccccccc", "dd", "e", "ffffffffffff"]:
        out = b.add(text)
    # sorted longest first: a, c, f (12) | d (2), b, e (1); the oldest ("a") is in a full batch of length 12
    assert out == [["aaaaaaaaaaaa", "cccccccccccc"]]
    assert len(b) == 4


def test_oldest_item_in_the_partial_remainder_goes_in_a_full_batch_cut_from_the_short_end():
    b = LengthBatcher(2, 10.0, len, window=100, clock=FakeClock())
    for text in ["a", "bbbbbbbbbbbb", "cccccccccccc", "d" * 30, "e" * 30]:
        b.add(text)
    # longest first: d e | b c | a (alone, partial); shortest first: a b | c d | e, so "a" goes beside "b"
    assert b.take_due() == [["a", "bbbbbbbbbbbb"]]


def test_token_budget_bounds_each_batch_and_a_longer_item_goes_alone():
    b = LengthBatcher(100, 10.0, len, window=1000, max_tokens=64, pad_multiple=8, clock=FakeClock())
    texts = ["x" * n for n in (70, 30, 30, 9, 9, 9, 9, 3, 3, 3, 3, 3, 3, 3, 3, 3)]
    for t in texts:
        b.add(t)
    batches = b.take_all()
    assert sorted(x for batch in batches for x in batch) == sorted(texts)  # each item once
    assert lengths_of(batches) == [[70], [30, 30], [9, 9, 9, 9], [3] * 8, [3]]
    assert all(b.cost([len(x) for x in batch]) <= 64 for batch in batches[1:])


def test_due_batch_is_the_oldest_items_even_when_the_window_is_not_full():
    clock = FakeClock()
    b = LengthBatcher(4, 0.5, len, window=100, clock=clock)
    b.add("old")
    clock.now += 0.3
    b.add("newer and much longer")
    assert b.time_left() == pytest.approx(0.2)
    clock.now += 0.2
    assert b.time_left() == 0.0
    assert b.take_due() == [["newer and much longer", "old"]]  # one partial batch: all there is
    assert b.time_left() is None and b.take_due() == []


def test_bucketing_keeps_padding_of_log_normal_lengths_under_the_target():
    """Texts of 5-512 tokens, log-normal: arrival-order batches pad about 5x; a 16-batch window about 1.1x."""
    lengths = np.clip(np.round(np.random.default_rng(0).lognormal(np.log(60), 0.9, 20000)), 5, 512).astype(int)
    b = LengthBatcher(256, 10.0, int, window=16 * 256, max_tokens=16384, clock=FakeClock())
    batches = [batch for n in lengths for batch in b.add(int(n))] + b.take_all()
    assert sorted(n for batch in batches for n in batch) == sorted(lengths.tolist())
    assert all(b.cost(batch) <= 16384 and len(batch) <= 256 for batch in batches)
    padding = sum(b.cost(batch) for batch in batches) / lengths.sum()
    fifo = sum(b.cost(list(chunk)) for chunk in np.array_split(lengths, len(lengths) // 256)) / lengths.sum()
    assert padding <= 1.15 < 4 < fifo


def test_length_batcher_bounds_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        LengthBatcher(4, 0.1, len, window=0)
