"""Image classification: decode and resize on the CPU, top-k on the device, labels in postprocess."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from beam_infer.task import InferenceTask


def decode_resize(data: bytes, size: int) -> np.ndarray:
    """Decodes image bytes (any format PIL reads) into an RGB uint8 array of shape (size, size, 3).

    Raises:
        ValueError: the bytes are empty or not a readable image.
    """
    if not data:
        raise ValueError("empty image file (0 bytes)")
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is large enough
        rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


CLASSIFICATION_SCHEMA = pa.schema([
    ("label", pa.string()),  # the record's known label when the input had one, else null
    ("top_labels", pa.list_(pa.string())),
    ("top_scores", pa.list_(pa.float32())),
])


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
) -> InferenceTask:
    """Builds the task for an image classifier that takes uint8 NHWC batches.

    Args:
        name: the model's name, written with every prediction and part of the engine's key.
        load_model: builds the classifier on the CPU (picklable; called once per worker process).
        labels: class names, indexed by the model's output.
        image_size: the side every image is resized to.
        top_k: how many labels and scores each prediction keeps.
    """
    return InferenceTask(
        name=name,
        load_model=_LoadTopK(load_model, top_k),
        preprocess=_Preprocess(image_size),
        postprocess=_Postprocess(labels),
        output_schema=CLASSIFICATION_SCHEMA,
    )


def shapes_classifier(top_k: int = 3) -> InferenceTask:
    """The shipped ShapesNet as a task: the default model of `python -m pipelines.run`."""
    from beam_infer.models.shapes_net import INPUT_SIZE, load_shapes_net
    from beam_infer.sample import SHAPE_CLASSES

    return image_classifier("shapes_net", load_shapes_net, SHAPE_CLASSES, image_size=INPUT_SIZE, top_k=top_k)
