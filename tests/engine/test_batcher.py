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


def test_full_window_gives_the_oldest_item_with_the_neighbours_that_pad_least():
    b = LengthBatcher(2, 10.0, len, window=6, clock=FakeClock())
    for text in ["aaaaaaaaaaaa", "b", "cccccccccccc", "dd", "e", "ffffffffffff"]:
        out = b.add(text)
    # by length: b e (1) | dd (2) | a c f (12); the oldest ("a") pads least beside "c", not beside "dd"
    assert out == [["cccccccccccc", "aaaaaaaaaaaa"]]
    assert len(b) == 4


def test_an_oldest_item_among_the_shortest_goes_with_the_next_shortest():
    b = LengthBatcher(2, 10.0, len, window=100, clock=FakeClock())
    for text in ["a", "bbbbbbbbbbbb", "cccccccccccc", "d" * 30, "e" * 30]:
        b.add(text)
    assert b.take_due() == [["bbbbbbbbbbbb", "a"]]


def test_a_short_oldest_item_is_not_passed_over_by_a_stream_of_long_ones():
    """Every batch holds the oldest item: under a budget a short one cannot starve behind longer ones."""
    b = LengthBatcher(8, 10.0, len, window=32, max_tokens=64, clock=FakeClock())
    b.add("x")
    first = []
    for i in range(31):
        first += b.add("y" * 60 + str(i))
    assert first and "x" in first[0]


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
