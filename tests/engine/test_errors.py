import asyncio

import pytest
import torch

from beam_infer.engine.errors import Owner, is_device_fault, is_out_of_memory, owner_of

pytestmark = pytest.mark.timeout(20)

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def _raised_from(cause: BaseException, error: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as c:
            raise error from c
    except BaseException as e:
        return e


@pytest.mark.parametrize("error", [
    torch.AcceleratorError(ILLEGAL_ADDRESS),
    torch.AcceleratorError("CUDA error: device-side assert triggered"),
    RuntimeError(ILLEGAL_ADDRESS),  # how torch before 2.8 raised it
    RuntimeError("CUDA error: unspecified launch failure"),
    _raised_from(torch.AcceleratorError(ILLEGAL_ADDRESS), ValueError("the user's model wrapped it")),
], ids=["illegal_address", "device_assert", "runtime_error_before_torch_2_8", "launch_failure", "wrapped"])
@pytest.mark.parametrize("scope", [Owner.RECORD, Owner.BATCH, Owner.RUN])
def test_a_device_fault_is_fatal_wherever_it_is_raised(error, scope):
    assert is_device_fault(error)
    assert owner_of(error, scope) is Owner.FATAL


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.AcceleratorError("CUDA error: out of memory"),
], ids=["OutOfMemoryError", "nvjpeg_RuntimeError", "accelerator_error_out_of_memory"])
@pytest.mark.parametrize("scope", [Owner.RECORD, Owner.BATCH])
def test_out_of_memory_is_not_fatal_and_stays_with_the_record_or_batch(error, scope):
    assert is_out_of_memory(error) and not is_device_fault(error)
    assert owner_of(error, scope) is scope


@pytest.mark.parametrize("scope", [Owner.RECORD, Owner.BATCH, Owner.RUN])
def test_an_ordinary_exception_belongs_to_the_scope_that_raised_it(scope):
    assert owner_of(ValueError("bad pixels"), scope) is scope
    assert owner_of(RuntimeError("Error while decoding JPEG images"), scope) is scope


@pytest.mark.parametrize("error", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3)])
def test_a_base_exception_that_is_not_an_exception_fails_the_run_not_a_record(error):
    assert owner_of(error, Owner.RECORD) is Owner.RUN
    assert owner_of(error, Owner.BATCH) is Owner.RUN


def test_an_error_a_handler_raised_from_none_is_not_the_devices():
    try:
        try:
            raise torch.AcceleratorError(ILLEGAL_ADDRESS)
        except torch.AcceleratorError:
            raise ValueError("corrupt image") from None
    except ValueError as e:
        error = e
    assert not is_device_fault(error) and owner_of(error, Owner.RECORD) is Owner.RECORD


def test_a_message_that_only_mentions_cuda_is_not_a_device_fault():
    assert not is_device_fault(RuntimeError("this model was exported for CUDA; running it on the CPU"))
