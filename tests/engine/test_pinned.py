import threading

import pytest
import torch

from beam_infer.engine.pinned import BufferPool

pytestmark = pytest.mark.timeout(20)


def test_buffers_are_reused_not_reallocated():
    pool = BufferPool(2, pin=False)
    for _ in range(10):
        lease = pool.acquire((8, 4), torch.uint8)
        assert lease.tensor.shape == (8, 4)
        lease.release()
    assert pool.allocations == 1


def test_a_larger_request_grows_the_buffer_and_smaller_ones_reuse_it():
    pool = BufferPool(1, pin=False)
    pool.acquire((4,), torch.float32).release()
    pool.acquire((16,), torch.float32).release()
    lease = pool.acquire((2, 3), torch.bfloat16)
    assert lease.tensor.dtype == torch.bfloat16 and lease.tensor.shape == (2, 3)
    assert pool.allocations == 2


def test_acquire_blocks_while_every_buffer_is_leased():
    pool = BufferPool(1, pin=False)
    first = pool.acquire((4,), torch.uint8)
    got = threading.Event()

    def take():
        pool.acquire((4,), torch.uint8)
        got.set()

    t = threading.Thread(target=take)
    t.start()
    assert not got.wait(0.2)  # still blocked while the only buffer is out
    first.release()
    assert got.wait(5)
    t.join()


@pytest.mark.gpu
def test_buffers_are_pinned_on_cuda():
    pool = BufferPool(1, pin=True)
    assert pool.acquire((1024,), torch.uint8).tensor.is_pinned()
