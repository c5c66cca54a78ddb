"""Image to image: uint8 images in, uint8 images of the same size out, encoded by the postprocess stage and written
by the engine's put stage.

The model sees uint8 NHWC and returns uint8 NHWC (`UInt8ImageToImage` converts on the device), so only bytes
cross PCIe both ways. Inputs are `.npy` arrays (raw HWC uint8: transfer-heavy, nothing to decode) or any image
PIL reads, resized to the task's size. Each output is encoded as PNG or `.npy` and returned as a
`beam_infer.task.Blob` named `<output_dir>/<safe name of the record's id>.<format>`
(`beam_infer.io.put.object_uri`: an id cannot name a path outside `output_dir`); the engine writes it (local
files atomically, remote objects with retries) and the row's `output_uri` becomes its URI.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from beam_infer.io.put import object_uri
from beam_infer.task import Blob, InferenceTask, record_id

IMAGE_TO_IMAGE_SCHEMA = pa.schema([
    ("output_uri", pa.string()),  # where the output image was written
    ("width", pa.int32()),  # the output image's size in pixels
    ("height", pa.int32()),
])
OUTPUT_FORMATS = ("png", "npy")


class UInt8ImageToImage(nn.Module):
    """Adapts a float NCHW image-to-image model (values in [0, 1]) to uint8 NHWC in and out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("_dtype", torch.zeros(()), persistent=False)  # follows the engine's .to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self._dtype.dtype) / 255  # channels_last strides, no copy
        y = self.model(x)
        return (y.float() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _npy_view(data: bytes) -> np.ndarray:
    """The array in `.npy` bytes, as a read-only view of them (np.load would copy: 786 KB per 512² image)."""
    header = io.BytesIO(data)
    fmt = np.lib.format
    read_header = fmt.read_array_header_1_0 if fmt.read_magic(header) == (1, 0) else fmt.read_array_header_2_0
    shape, fortran_order, dtype = read_header(header)
    if dtype.hasobject:
        raise ValueError(".npy arrays of Python objects are not read")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=header.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def read_image(data: bytes, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 array from `.npy` bytes (used as is) or an image file (decoded and resized).

    Raises:
        ValueError: the bytes are empty, unreadable, or a `.npy` array of another shape or dtype.
    """
    if not data:
        raise ValueError("empty input file (0 bytes)")
    if data.startswith(b"\x93NUMPY"):
        array = _npy_view(data)
        if array.shape != (size, size, 3) or array.dtype != np.uint8:
            raise ValueError(f"expected a ({size}, {size}, 3) uint8 array, got {array.shape} {array.dtype}")
        return array
    from beam_infer.tasks.classify import decode_resize

    return decode_resize(data, size)


def encode_image(image: np.ndarray, fmt: str) -> list[bytes | memoryview]:
    """Encodes an HWC uint8 array as `.npy` (raw, fast: a header and the array's own memory, no copy) or PNG
    (compressed, lossless, slower); returns the parts to write one after the other."""
    out = io.BytesIO()
    if fmt == "npy":
        image = np.ascontiguousarray(image)
        np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(image))
        return [out.getvalue(), memoryview(image).cast("B")]
    Image.fromarray(image).save(out, format="PNG", compress_level=1)
    return [out.getvalue()]


class _Read:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, data: bytes, record: Mapping[str, Any]) -> np.ndarray:
        return read_image(data, self.size)


class _Encode:
    def __init__(self, output_dir: str, fmt: str) -> None:
        self.output_dir = output_dir
        self.fmt = fmt

    def __call__(self, outputs: tuple[np.ndarray, ...], record: Mapping[str, Any]) -> dict[str, Any]:
        image = outputs[0]  # a view of a reused buffer: encode_image reads it now, Blob copies what it keeps
        height, width = image.shape[:2]
        uri = object_uri(self.output_dir, record_id(record), "." + self.fmt)
        return {"output_uri": Blob(uri, encode_image(image, self.fmt)), "width": width, "height": height}


class _LoadUInt8:
    def __init__(self, load_model: Callable[[], nn.Module]) -> None:
        self.load_model = load_model

    def __call__(self) -> nn.Module:
        model = self.load_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.load_model!r} returned {type(model).__name__}, not a torch.nn.Module")
        return UInt8ImageToImage(model)


def image_to_image(name: str, load_model: Callable[[], nn.Module], output_dir: str, *, image_size: int,
                   output_format: str = "png") -> InferenceTask:
    """Builds the task for a model that maps (N, 3, H, W) float images in [0, 1] to images of the same size.

    Its rows are `output_uri` (the output image's URI), `width` and `height` (int32), beside id, uri and model.

    Args:
        name: the model's name.
        load_model: builds the model on the CPU (picklable).
        output_dir: the directory or URL (any fsspec URL) the output images go under, one per record, named
            after the record's id (`beam_infer.io.put.object_uri`); local directories are created as needed.
        image_size: inputs are resized to (image_size, image_size, 3); `.npy` inputs must have that shape.
        output_format: "png" (lossless, compressed) or "npy" (raw HWC uint8: larger, faster to write).

    Raises:
        ValueError: an unknown output format.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return InferenceTask(name=name, load_model=_LoadUInt8(load_model), preprocess=_Read(image_size),
                         postprocess=_Encode(output_dir, output_format), output_schema=IMAGE_TO_IMAGE_SCHEMA)
