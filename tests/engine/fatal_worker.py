"""A worker process that meets a device fault in its third batch; the engine must end it with exit code 70.

    python -m tests.engine.fatal_worker fake   # the model raises torch.AcceleratorError (any machine)
    python -m tests.engine.fatal_worker cuda   # the model triggers a real device-side assert (needs CUDA)

Prints "bundle failed: <error>" when its bundle raised, then waits for the engine to end the process; printing
"still alive" means the engine never did.
"""

import sys
import threading

import torch

from beam_infer.config import EngineConfig
from beam_infer.engine import Engine, EngineError
from tests.fakes import Doubler, number_task, safe, write_numbers

_FAULT_AT_CALL = 3


class _FaultyModel(Doubler):
    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= _FAULT_AT_CALL:
            if self.fault == "fake":
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            out_of_bounds = torch.full((len(x),), 1 << 30, device=x.device, dtype=torch.long)
            return x.reshape(-1)[out_of_bounds].reshape(x.shape)  # an index kernel's device-side assert
        return super().forward(x)


def main(fault: str) -> None:
    device = "cuda" if fault == "cuda" else "cpu"
    engine = Engine(number_task(_FaultyModel(fault)), EngineConfig(device=device, dtype="float32", batch_size=4,
                                                                   max_batch_wait_s=1.0)).retain()
    bundle = engine.open_bundle()
    try:
        for record in write_numbers(safe(32)):
            bundle.submit(record)
        results = list(bundle.drain())
    except EngineError as e:
        print(f"bundle failed: {e}", flush=True)
    else:
        print(f"bundle finished: {sum(r.failure is not None for r in results)} dead letters", flush=True)
    threading.Event().wait(60)
    print("still alive", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
