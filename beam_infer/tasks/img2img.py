"""Image to image: uint8 images in, uint8 images out, encoded and written by the postprocess stage.

The model sees uint8 NHWC and returns uint8 NHWC (`UInt8ImageToImage` converts on the device), so only bytes
cross PCIe both ways. Inputs are `.npy` arrays (raw HWC uint8: transfer-heavy, nothing to decode) or any image
PIL reads; outputs are written as `<output_dir>/<id>.npy` or `.png` through fsspec.
"""

from __future__ import annotations

import io
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from beam_infer.io.fetch import open_uri
from beam_infer.task import InferenceTask, record_id

IMAGE_TO_IMAGE_SCHEMA = pa.schema([("output_uri", pa.string()), ("output_bytes", pa.int64())])
OUTPUT_FORMATS = ("npy", "png")


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


class _Write:
    def __init__(self, output_dir: str, fmt: str) -> None:
        self.output_dir = output_dir.rstrip("/")
        self.fmt = fmt

    def __call__(self, outputs: tuple[np.ndarray, ...], record: Mapping[str, Any]) -> dict[str, Any]:
        parts = encode_image(outputs[0], self.fmt)
        name = urllib.parse.quote(record_id(record), safe="")  # one file per id: "a/b" and "a_b" stay apart
        uri = f"{self.output_dir}/{name}.{self.fmt}"
        with open_uri(uri, "wb") as f:
            for part in parts:
                f.write(part)
        return {"output_uri": uri, "output_bytes": sum(len(part) for part in parts)}


class _LoadUInt8:
    def __init__(self, load_model: Callable[[], nn.Module]) -> None:
        self.load_model = load_model

    def __call__(self) -> nn.Module:
        return UInt8ImageToImage(self.load_model())


def image_to_image(name: str, load_model: Callable[[], nn.Module], output_dir: str, *, image_size: int,
                   output_format: str = "npy") -> InferenceTask:
    """Builds the task for a model that maps (N, 3, H, W) float images in [0, 1] to images of the same size.

    Args:
        name: the model's name.
        load_model: builds the model on the CPU (picklable).
        output_dir: where the postprocess stage writes each output image (any fsspec URL); it must exist
            for local paths.
        image_size: inputs are (image_size, image_size, 3).
        output_format: "npy" or "png".

    Raises:
        ValueError: an unknown output format.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    return InferenceTask(name=name, load_model=_LoadUInt8(load_model), preprocess=_Read(image_size),
                         postprocess=_Write(output_dir, output_format), output_schema=IMAGE_TO_IMAGE_SCHEMA)
