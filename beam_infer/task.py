"""InferenceTask: what a model needs from the engine, as plain picklable callables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

Record = Mapping[str, Any]


@dataclass(frozen=True)
class InferenceTask:
    """The pluggable parts of an inference job.

    Attributes:
        name: the model's name; with the device and dtype it keys the one engine per worker process.
        load_model: builds the model on the CPU; the engine moves it to its device and dtype. The model takes
            a batch stacked from `preprocess` outputs (for images, uint8 NHWC) and returns a tensor or a tuple
            of tensors whose first dimension is the batch.
        preprocess: (bytes, record) -> array of one fixed shape and dtype; runs in the decode thread pool.
        postprocess: (tuple of per-record output rows as numpy, record) -> dict of output fields; runs in the
            postprocess thread pool.
    """

    name: str
    load_model: Callable[[], nn.Module]
    preprocess: Callable[[bytes, Record], np.ndarray]
    postprocess: Callable[[tuple[np.ndarray, ...], Record], dict[str, Any]]
