"""Small fakes for engine and DoFn tests: a number-reading task, a doubling model, failure switches."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import uuid
from collections import Counter

import fsspec
import numpy as np
import torch
from torch import nn

from beam_infer.task import InferenceTask

POISON_PREPROCESS = -1.0  # preprocess raises on this value
POISON_FORWARD = 13.0  # the model raises for any batch that holds this value
POISON_POSTPROCESS = 7.0  # postprocess raises on this value


def write_numbers(values) -> list[dict]:
    """Writes each value as 4 float32 bytes under memory:// and returns their records (id, uri, value)."""
    root = f"memory://beam_infer_tests/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    records = []
    for i, v in enumerate(values):
        uri = f"{root}/{i:05d}.bin"
        fs.pipe(uri, np.array([v], dtype=np.float32).tobytes())
        records.append({"id": f"n{i}", "uri": uri, "value": float(v)})
    return records


def read_number(data: bytes, record) -> np.ndarray:
    value = np.frombuffer(data, dtype=np.float32)
    if value.size and value[0] == POISON_PREPROCESS:
        raise ValueError("poisoned preprocess")
    return value.copy()


def twice(outputs, record) -> dict:
    (row,) = outputs
    if float(record["value"]) == POISON_POSTPROCESS:
        raise RuntimeError("poisoned postprocess")
    return {"doubled": float(row[0])}


class Doubler(nn.Module):
    """Doubles its input; raises for any batch containing POISON_FORWARD; records the batch sizes it saw. With a
    `gate`, each forward waits for it to be set; `entered` is set once a forward has begun."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.batch_sizes: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.batch_sizes.append(len(x))
        if (x == POISON_FORWARD).any():
            raise ValueError("poisoned forward")
        return x * self.scale


def number_task(model: nn.Module | None = None, name: str = "doubler") -> InferenceTask:
    return InferenceTask(name=name, load_model=(lambda: model) if model is not None else Doubler,
                         preprocess=read_number, postprocess=twice)


def safe(n: int) -> list[float]:
    """n values that no failure switch reacts to."""
    return [100.0 + i for i in range(n)]


def marking_processes(task: InferenceTask, directory: str) -> InferenceTask:
    """`task`, leaving files in `directory` that tell which processes loaded its model and processed records.

    Files, not Beam metrics, so that the test's process can count what worker processes did independently of
    the DoFn's own counters: `load-<pid>-<uuid>` per model load, `rows-<pid>` once a process postprocessed.
    """
    return dataclasses.replace(task, load_model=functools.partial(_load_marked, task.load_model, directory),
                               postprocess=functools.partial(_postprocess_marked, task.postprocess, directory))


def _load_marked(load_model, directory: str):
    open(os.path.join(directory, f"load-{os.getpid()}-{uuid.uuid4().hex}"), "x").close()
    return load_model()


def _postprocess_marked(postprocess, directory: str, outputs, record) -> dict:
    open(os.path.join(directory, f"rows-{os.getpid()}"), "a").close()
    return postprocess(outputs, record)


def process_marks(directory: str) -> tuple[Counter[int], set[int]]:
    """(model loads per process id, ids of the processes that postprocessed records) left by marking_processes."""
    names = [n.split("-") for n in os.listdir(directory)]
    return Counter(int(n[1]) for n in names if n[0] == "load"), {int(n[1]) for n in names if n[0] == "rows"}


def run_all(engine, records) -> list:
    """Submits `records` to `engine` as one bundle, polling as a DoFn's process() does, and drains it."""
    bundle = engine.open_bundle()
    out = []
    for r in records:
        bundle.submit(r)
        out += bundle.poll()
    out += list(bundle.drain())
    return out
