"""Image classification: decode and resize on the CPU (libjpeg-turbo for JPEG, else PIL) or on the device
(nvJPEG), top-k on the device, labels in postprocess."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg  # imported here, not in a decode thread: about 1 s, once

from beam_infer.task import InferenceTask

DECODE_PLACES = ("cpu", "device")
_JPEG_MAGIC = b"\xff\xd8\xff"
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, and warns on every call; nvJPEG through
# torchvision.io.decode_jpeg is still what this project measures (../shared/design.md).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=Warning)  # a UserWarning in some versions, a DeprecationWarning in others


def decode_resize(data: bytes, size: int) -> np.ndarray:
    """Decodes image bytes (any format PIL reads) into an RGB uint8 array of shape (size, size, 3), resized
    bilinearly with antialiasing.

    Where torch's intra-op pool is one thread (the engine makes it so on CUDA workers, whose CPU runs no model),
    a JPEG goes through libjpeg-turbo and torch's uint8 resize (torchvision.io.decode_jpeg, F.interpolate): two
    C calls that hold the GIL only briefly, about 1.8x the rate of PIL's decode + resize on 500x375 images,
    with the same pixels within 1 of 255. Elsewhere, and for JPEGs PIL's reduced-scale decode serves better
    (both sides at least twice `size`), too large for PIL's decompression-bomb limit, or refused by libjpeg,
    PIL decodes and resizes on the calling thread alone, and its error is the one a bad file gets.

    Raises:
        ValueError: the bytes are empty.
        OSError (PIL.UnidentifiedImageError among them): the bytes are not a readable image.
        PIL.Image.DecompressionBombError: the image has more than twice PIL's MAX_IMAGE_PIXELS.
    """
    if not data:
        raise ValueError("empty image file (0 bytes)")
    if data.startswith(_JPEG_MAGIC) and _torch_path_suits(data, size):
        try:
            return _decode_resize_jpeg(data, size)
        except RuntimeError:
            pass  # PIL decides, and names the error when it cannot read the file either
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is large enough
        rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _torch_path_suits(data: bytes, size: int) -> bool:
    # With more than one intra-op thread, each decode thread's resize would start an OpenMP team of its own.
    if torch.get_num_threads() != 1:
        return False
    dims = jpeg_size(data)
    if dims is None:
        return False
    width, height = dims
    limit = Image.MAX_IMAGE_PIXELS
    return not (limit and width * height > limit) and not (width >= 2 * size and height >= 2 * size)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None where the markers before it do not parse."""
    i, end = 2, len(data)
    while i + 4 <= end and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: length, precision, height, width
            if i + 9 > end:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _decode_resize_jpeg(data: bytes, size: int) -> np.ndarray:
    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    resized = F.interpolate(chw[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).contiguous().numpy()


CLASSIFICATION_SCHEMA = pa.schema([
    ("label", pa.string()),  # the record's known label when the input had one, else null
    ("top_labels", pa.list_(pa.string())),
    ("top_scores", pa.list_(pa.float32())),
])


def encoded_jpeg(data: bytes) -> np.ndarray:
    """The bytes of a JPEG file as a 1-D uint8 array, for decoding on the device.

    Raises:
        ValueError: the bytes are empty or not a JPEG.
    """
    if not data:
        raise ValueError("empty image file (0 bytes)")
    if not data.startswith(_JPEG_MAGIC):
        raise ValueError(f"not a JPEG file (starts with {data[:4]!r}); decoding on the device reads JPEG only")
    return np.frombuffer(data, dtype=np.uint8).copy()


def decode_resize_batch(encoded: list[torch.Tensor], device: torch.device, size: int) -> torch.Tensor:
    """Decodes JPEGs (CPU uint8 tensors of their bytes) on `device` — nvJPEG, batched, on CUDA — and resizes them
    (bilinear, antialiased) into one uint8 NHWC batch of (size, size) on the device."""
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    if all(image.shape == images[0].shape for image in images):
        groups = [torch.stack(images)]  # one resize for the batch
    else:
        groups = [image.unsqueeze(0) for image in images]
    resized = torch.cat([F.interpolate(g.float(), size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False) for g in groups])
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class TopK(nn.Module):
    """Wraps a classifier so the device returns only (top-k probabilities, top-k class indices)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.model(images).float().softmax(dim=-1)
        scores, indices = probs.topk(min(self.k, probs.shape[-1]), dim=-1)
        return scores, indices.to(torch.int32)


class _Preprocess:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, data: bytes, record: Mapping[str, Any]) -> np.ndarray:
        return decode_resize(data, self.size)


class _EncodedJpeg:
    def __call__(self, data: bytes, record: Mapping[str, Any]) -> np.ndarray:
        return encoded_jpeg(data)


class _DecodeResizeOnDevice:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, encoded: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        return decode_resize_batch(encoded, device, self.size)


class _Postprocess:
    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)

    def __call__(self, outputs: tuple[np.ndarray, ...], record: Mapping[str, Any]) -> dict[str, Any]:
        scores, indices = outputs
        return {
            "top_labels": [self.labels[int(i)] for i in indices],
            "top_scores": [float(s) for s in scores],
        }


class _LoadTopK:
    def __init__(self, load_model: Callable[[], nn.Module], k: int) -> None:
        self.load_model = load_model
        self.k = k

    def __call__(self) -> nn.Module:
        return TopK(self.load_model(), self.k)


def image_classifier(
    name: str, load_model: Callable[[], nn.Module], labels: Sequence[str], *, image_size: int, top_k: int = 3,
    decode: str = "cpu",
) -> InferenceTask:
    """Builds the task for an image classifier that takes uint8 NHWC batches.

    Args:
        name: the model's name, written with every prediction and part of the engine's key.
        load_model: builds the classifier on the CPU (picklable; called once per worker process).
        labels: class names, indexed by the model's output.
        image_size: the side every image is resized to.
        top_k: how many labels and scores each prediction keeps.
        decode: "cpu" (in the decode thread pool; any format PIL reads) or "device" (JPEG only, decoded
            in batches on the engine's device: nvJPEG on CUDA, so only compressed bytes cross PCIe).

    Raises:
        ValueError: `decode` is not one of DECODE_PLACES.
    """
    if decode not in DECODE_PLACES:
        raise ValueError(f"decode must be one of {DECODE_PLACES}, got {decode!r}")
    on_device = decode == "device"
    return InferenceTask(
        name=name,
        load_model=_LoadTopK(load_model, top_k),
        preprocess=_EncodedJpeg() if on_device else _Preprocess(image_size),
        postprocess=_Postprocess(labels),
        output_schema=CLASSIFICATION_SCHEMA,
        device_preprocess=_DecodeResizeOnDevice(image_size) if on_device else None,
    )


def shapes_classifier(top_k: int = 3, decode: str = "cpu") -> InferenceTask:
    """The shipped ShapesNet as a task: the default model of `python -m pipelines.run`."""
    from beam_infer.models.shapes_net import INPUT_SIZE, load_shapes_net
    from beam_infer.sample import SHAPE_CLASSES

    return image_classifier("shapes_net", load_shapes_net, SHAPE_CLASSES, image_size=INPUT_SIZE, top_k=top_k,
                            decode=decode)
