"""Models by name: the shipped ShapesNet, torchvision classifiers, the shipped image filters, or a user's
`module:function`."""

from __future__ import annotations

import dataclasses
import importlib
import io

import torch
from torch import nn

from beam_infer.task import InferenceTask

DEFAULT_MODEL = "shapes_net"
DEFAULT_IMG2IMG_MODEL = "unsharp"
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


class WithWeights:
    """Builds a model with `load_model`, then loads the state dict at `uri` (a local path or any fsspec URL:
    gs://, s3://, …) into it: into the model that --model names, inside the task's adapters (uint8 input, top-k)
    where its keys are those of the model within. Read with weights_only=True (tensors and plain containers, no
    pickled code), on each worker."""

    def __init__(self, load_model, uri: str) -> None:
        self.load_model = load_model
        self.uri = uri

    def __call__(self) -> nn.Module:
        from beam_infer.io.fetch import fetch_bytes

        model = self.load_model()
        state = torch.load(io.BytesIO(fetch_bytes(self.uri)), map_location="cpu", weights_only=True)
        state = {key.removeprefix("_orig_mod."): value for key, value in state.items()}  # saved after compile
        target = model  # beam_infer's adapters (uint8 input, top-k) hold the named model as `.model`
        while (type(target).__module__.startswith("beam_infer.") and set(target.state_dict()) != set(state)
               and isinstance(getattr(target, "model", None), nn.Module)):
            target = target.model
        target.load_state_dict(state)  # strict: a checkpoint of another model names its missing keys
        return model


def with_weights(task: InferenceTask, uri: str) -> InferenceTask:
    """`task` with its model's weights read from `uri` (see WithWeights)."""
    return dataclasses.replace(task, load_model=WithWeights(task.load_model, uri))


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
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"unknown --model {spec!r}: torchvision {torchvision.__version__} has no model {name!r} "
                             "(see torchvision.models.list_models())")
        return image_classifier(f"torchvision:{name}", _TorchvisionModel(name),
                                [f"class_{i}" for i in range(1000)], image_size=224, top_k=top_k, decode=decode)
    if prefix and name:
        task = getattr(importlib.import_module(prefix), name)()
        if not isinstance(task, InferenceTask):
            raise ValueError(f"--model {spec}: {name}() returned {type(task).__name__}, not an InferenceTask")
        return task
    raise ValueError(f"unknown --model {spec!r}: use shapes_net, torchvision:<name> or <module>:<function>")


def resolve_img2img_task(spec: str, output_dir: str, image_size: int, output_format: str = "png") -> InferenceTask:
    """The image-to-image task a model name stands for; each output image goes under `output_dir`.

    Args:
        spec: "unsharp" or "blur" (shipped fixed-kernel filters, beam_infer/models/filters.py); or
            "<module>:<function>", a picklable function that builds a float NCHW model mapping images in [0, 1]
            to images of the same size (it is called on each worker, not here).
        output_dir: where the outputs are written (a directory or URL).
        image_size: inputs are resized to (image_size, image_size); outputs have the same size.
        output_format: "png" or "npy".

    Raises:
        ValueError: the name is not one of the forms above, or the module has no such function.
    """
    from beam_infer.models.filters import FILTERS
    from beam_infer.tasks.img2img import image_to_image

    if spec in FILTERS:
        load_model = FILTERS[spec]
    else:
        module, _, name = spec.partition(":")
        if not (module and name):
            raise ValueError(f"unknown --model {spec!r}: use {', '.join(FILTERS)} or <module>:<function>")
        load_model = getattr(importlib.import_module(module), name, None)
        if not callable(load_model):
            raise ValueError(f"--model {spec}: {module} has no function {name}")
    return image_to_image(spec, load_model, output_dir, image_size=image_size, output_format=output_format)
