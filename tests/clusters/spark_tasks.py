"""A task for `--model tests.clusters.spark_tasks:<function>` in the Spark cluster tests (the rest come from
tests.clusters.tasks): SDK workers that die while they run bundles, in every attempt."""

from __future__ import annotations

import dataclasses
import os
import signal

from torch import nn

from beam_infer.task import InferenceTask
from tests.clusters.tasks import numbers


class _DieInForward(nn.Module):
    """SIGKILLs its own process on its first batch: the SDK worker dies in the middle of a bundle."""

    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)


def dying_in_forward() -> InferenceTask:
    """The numbers task whose model kills the SDK worker running it, in every attempt: the job cannot succeed.

    (tasks.dying kills the worker in the model's load instead; on Spark each such attempt waits 3 minutes, Beam's
    "No client connected within timeout", before it fails: see test_spark_cluster.py.)
    """
    return dataclasses.replace(numbers(), load_model=_DieInForward)
