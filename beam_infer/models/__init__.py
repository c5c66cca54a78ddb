"""Models by name: the shipped ShapesNet, torchvision classifiers, or a user's `module:function`."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from beam_infer.task import InferenceTask

DEFAULT_MODEL = "shapes_net"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class UInt8ImageInput(nn.Module):
    """Adapts an NCHW float model to uint8 NHWC input, normalising on the device (4x fewer bytes over PCIe)."""

    def __init__(self, model: nn.Module, mean=_IMAGENET_MEAN, std=_IMAGENET_STD) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, 3, 1, 1) * 255))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype)  # channels_last strides, no copy
        return self.model((x - self.mean) * self.inv_std)


class _TorchvisionModel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> nn.Module:
        import torchvision

        return UInt8ImageInput(torchvision.models.get_model(self.name, weights=None))


def resolve_task(spec: str = DEFAULT_MODEL, top_k: int = 3, decode: str = "cpu") -> InferenceTask:
    """The task a model name stands for.

    Args:
        spec: "shapes_net" (shipped, trained); "torchvision:<name>" (architecture with random weights, 224²
            input, for benchmarks); or "<module>:<function>" returning an InferenceTask.
        top_k: labels kept per prediction (classifiers).
        decode: where classifiers decode images: "cpu" (decode threads; any format PIL reads) or "device"
            (nvJPEG on CUDA; JPEG only).

    Raises:
        ValueError: the name is not one of the forms above.
    """
    from beam_infer.tasks.classify import image_classifier, shapes_classifier

    if spec == "shapes_net":
        return shapes_classifier(top_k, decode)
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision" and name:
        return image_classifier(f"torchvision:{name}", _TorchvisionModel(name),
                                [f"class_{i}" for i in range(1000)], image_size=224, top_k=top_k, decode=decode)
    if prefix and name:
        task = getattr(importlib.import_module(prefix), name)()
        if not isinstance(task, InferenceTask):
            raise ValueError(f"--model {spec}: {name}() returned {type(task).__name__}, not an InferenceTask")
        return task
    raise ValueError(f"unknown --model {spec!r}: use shapes_net, torchvision:<name> or <module>:<function>")
