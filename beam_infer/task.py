"""InferenceTask: what a model needs from the engine, as plain picklable callables."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
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
        preprocess: (bytes, record) -> array of one fixed shape and dtype; runs in the decode thread pool. It may
            return a Preprocessed instead: the array, and fields that postprocess finds in the record it gets.
        postprocess: (tuple of per-record output rows as numpy, record) -> dict of output fields; runs in the
            postprocess thread pool. A field whose value is a Blob is written by the engine's put stage, and the
            row gets the Blob's URI in its place. The rows are views of reused (pinned) buffers, valid during the
            call: the engine copies numpy arrays and tensors left in the returned value, but anything else that
            keeps their memory (pa.array, Image.fromarray, memoryview) must copy first.
        device_preprocess: optional (list of CPU uint8 tensors, device) -> the model's input batch on the device.
            When set, `preprocess` may return 1-D uint8 arrays of any length (the encoded image, say), and the
            batch thread hands them over as a list instead of stacking them: decoding moves to the device (for
            example nvJPEG). It runs on the H2D stream; an error is bisected down to the records that cause it.
        output_schema: the columns a prediction row has beyond id, uri and model (postprocess fields, and any
            record field worth keeping, such as a known label); `WritePredictions` writes exactly these.
        pad_value: set for variable-length inputs (token ids, say): `preprocess` may return arrays whose first
            dimension varies (the rest of the shape and the dtype are the batch's); the engine groups records of
            similar length (EngineConfig.bucket_batches, max_tokens) and pads each batch to its longest, rounded
            up to EngineConfig.pad_multiple, with this value, which must be one of the dtype's values that no
            input holds: the model tells padding from input by it (a mask). Outputs per position reach the
            postprocess at the batch's padded width. Not with `device_preprocess`.
        inline_field: the record field that carries the input itself (a text, say) when the record has no "uri":
            no fetch, `preprocess` gets the field's value in place of the bytes; a record with neither fails in
            preprocess, naming both. Give such records an "id": it is their only name in the outputs.
    """

    name: str
    load_model: Callable[[], nn.Module]
    preprocess: Callable[[bytes, Record], np.ndarray]
    postprocess: Callable[[tuple[np.ndarray, ...], Record], dict[str, Any]]
    output_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    device_preprocess: Callable[[list[torch.Tensor], torch.device], torch.Tensor] | None = None
    pad_value: int | float | None = None
    inline_field: str | None = None

    def __post_init__(self) -> None:
        if self.pad_value is not None and self.device_preprocess is not None:
            raise ValueError(f"task {self.name}: pad_value (variable-length inputs padded on the host) and "
                             f"device_preprocess (inputs handed to the device as a list) exclude each other")


@dataclass(frozen=True)
class Preprocessed:
    """A preprocess's array with fields for its postprocess (a text's token count, say): the record that
    postprocess gets has them added, and the record itself is left as it is."""

    array: Any
    fields: dict[str, Any]


def record_id(record: Record) -> str:
    """A record's id: its "id" field, else its URI."""
    rid = record.get("id")
    return str(rid) if rid not in (None, "") else str(record.get("uri", ""))


@dataclass(frozen=True, init=False)
class Blob:
    """An object for the engine's put stage: a postprocess returns it as the value of an output field; the engine
    writes `data` to `uri` (remote URIs through its async client, with retries; local paths under a temporary
    name, then renamed) and the field's value becomes `uri`. A record whose write fails is a dead letter of stage
    "put". Name objects with beam_infer.io.put.object_uri.

    `data` is joined into one bytes object at construction, so it holds no view of the engine's reused buffers.
    """

    uri: str
    data: bytes

    def __init__(self, uri: str, data: bytes | Iterable[bytes | memoryview]) -> None:
        object.__setattr__(self, "uri", uri)
        if not isinstance(data, bytes):
            data = bytes(data) if isinstance(data, (bytearray, memoryview)) else b"".join(data)
        object.__setattr__(self, "data", data)

    def __repr__(self) -> str:
        return f"Blob({self.uri!r}, {len(self.data)} bytes)"
