"""Tasks for `--model tests.clusters.tasks:<function>` in the cluster tests. The launcher calls the function and
pickles the task it returns to the SDK workers, so whatever it reads from the environment (the marks folder) is
read in the launcher, and the workers import only this module (the worker pool's PYTHONPATH holds the repo).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from beam_infer.models import resolve_task
from beam_infer.task import InferenceTask
from tests.fakes import marking_processes, number_task

MARKS_ENV = "BEAM_INFER_TEST_MARKS"  # a folder: marking_processes leaves per-process marks there
FORWARD_SLEEP_S = 0.01  # per batch: keeps a numbers job running long enough to kill a worker in the middle


def marked_classify() -> InferenceTask:
    """The default classifier (shapes_net), marking which processes loaded it and wrote rows (in $MARKS_ENV)."""
    return marking_processes(resolve_task(), os.environ[MARKS_ENV])


def _read_value(data: bytes, record) -> np.ndarray:
    return np.array([float(data.decode())], dtype=np.float32)


def _doubled(outputs, record) -> dict:
    (row,) = outputs
    return {"doubled": float(row[0])}


class SlowDoubler(nn.Module):
    """Doubles its input after a short sleep per batch (no poison values, unlike fakes.Doubler)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(FORWARD_SLEEP_S)
        return x * self.scale


def numbers() -> InferenceTask:
    """Doubles the number in each text file (cheap records), with a short sleep per batch; marks processes."""
    task = dataclasses.replace(number_task(name="numbers"), load_model=SlowDoubler, preprocess=_read_value,
                               postprocess=_doubled, output_schema=pa.schema([("doubled", pa.float64())]))
    return marking_processes(task, os.environ[MARKS_ENV])


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def dying() -> InferenceTask:
    """A numbers task whose model load SIGKILLs the SDK worker process, in every attempt: the job cannot succeed."""
    return dataclasses.replace(numbers(), load_model=_die)


def write_numbers(directory: str, n: int) -> str:
    """n text files `<i>.txt` holding i, and a JSONL manifest of them (id, uri); returns the manifest's path."""
    import json

    os.makedirs(directory, exist_ok=True)
    manifest = os.path.join(directory, "manifest.jsonl")
    with open(manifest, "w") as m:
        for i in range(n):
            path = os.path.join(directory, f"{i:05d}.txt")
            with open(path, "w") as f:
                f.write(str(i))
            m.write(json.dumps({"id": f"n{i}", "uri": path}) + "\n")
    return manifest
