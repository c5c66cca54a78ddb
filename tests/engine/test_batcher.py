import pytest

from beam_infer.engine.batcher import Batcher

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_batch_is_returned_when_size_is_reached():
    b = Batcher(3, max_wait_s=1.0, clock=FakeClock())
    assert b.add("a") is None
    assert b.add("b") is None
    assert b.add("c") == ["a", "b", "c"]
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
    assert b.take() == [1, 2]
    assert b.time_left() is None


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(0, 0.1)
