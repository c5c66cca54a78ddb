"""The benchmark scenarios: data, model, batch size, the tasks each competitor runs, and the bound that counts.

    classify-cpu-decode  ResNet-50 (torchvision, random weights), JPEGs of 500x375 decoded (libjpeg-turbo) and
                         resized on CPU threads; the ceiling is the CPU's decode rate.
    classify-gpu-decode  the same model and JPEGs, decoded in batches by nvJPEG and resized on the GPU; the
                         bound is decode and forward sharing the GPU: 1 / (1/decode + 1/forward).
    img2img              a light conv net on 3x512² uint8 images in and out (raw .npy files): transfer-heavy;
                         the postprocess stage encodes every output, the put stage writes it; the bound is
                         forward only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from beam_infer.models import resolve_task
from beam_infer.task import InferenceTask
from beam_infer.tasks.classify import image_classifier
from beam_infer.tasks.img2img import image_to_image


@dataclass(frozen=True)
class Target:
    """A figure to reach on CUDA (../shared/design.md and issue 4): `value(result)` must be at least `minimum`."""

    text: str
    value: Callable[[dict[str, Any]], float | None]
    minimum: float

    def check(self, result: dict[str, Any]) -> dict[str, Any]:
        value = self.value(result)
        return {"target": self.text, "minimum": self.minimum, "value": value,
                "met": value is not None and value >= self.minimum}


def _steady(result: dict[str, Any], name: str) -> float | None:
    return next((c["steady_records_per_s"] for c in result["competitors"] if c["name"] == name), None)


def _field(name: str, key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda result: next((c[key] for c in result["competitors"] if c["name"] == name), None)


def _times_runinference(result: dict[str, Any]) -> float | None:
    ours, theirs = _steady(result, "beam_infer"), _steady(result, "runinference")
    return ours / theirs if ours and theirs else None


def _times_spdl(result: dict[str, Any]) -> float | None:
    ours, theirs = _steady(result, "beam_infer"), _steady(result, "spdl")
    return ours / theirs if ours and theirs else None


def _util_over_spdl(result: dict[str, Any]) -> float | None:
    ours, theirs = GPU_UTIL(result), _field("spdl", "gpu_util_pct")(result)
    return ours - theirs if ours is not None and theirs is not None else None


def _on_h100(result: dict[str, Any]) -> float | None:
    return _steady(result, "beam_infer") if "H100" in result["device"] else None


RATIO = _field("beam_infer", "ratio_to_bound")
GPU_UTIL = _field("beam_infer", "gpu_util_pct")
# Issue 12: beam_infer within 5% of the seed's own pipeline run without Beam, on the same data and settings.
SPDL_TARGETS = (Target("beam_infer / spdl", _times_spdl, 0.95),
                Target("GPU utilisation points, beam_infer - spdl", _util_over_spdl, -3.0))


@dataclass(frozen=True)
class Scenario:
    """One benchmark setting.

    Attributes:
        data: (kind, width, height) of the generated inputs (see benchmarks/data.py).
        make_task: (decode place, output directory, input width) -> the task; decode is "cpu" or "device".
        decode: where beam_infer and the naive loop decode ("cpu" or "device"); RunInference decodes on CPU.
        bound: names the bound that beam_infer's ratio is taken against; see `relevant_bound`.
        channels_last: the model's memory format on CUDA.
    """

    name: str
    data: tuple[str, int, int]
    make_task: Callable[[str, str, int], InferenceTask]
    decode: str
    bound: str
    batch_size: int = 256
    channels_last: bool = True
    default_items: int = 3072
    targets: tuple[Target, ...] = ()

    def task(self, output_dir: str, decode: str | None = None) -> InferenceTask:
        return self.make_task(decode or self.decode, output_dir, self.data[1])

    def relevant_bound(self, bounds: dict[str, float]) -> tuple[str, float]:
        """(name, records/s) of the bound the competitors are held against in this run."""
        if self.bound == "decode_and_forward":
            value = 1 / (1 / bounds["device_decode"] + 1 / bounds["forward_only"])
            return "decode_and_forward", value
        if self.bound == "cpu_decode_or_forward":  # the slower of the two stages limits the pipeline
            name = min(("cpu_decode", "forward_only"), key=lambda k: bounds[k])
            return name, bounds[name]
        return self.bound, bounds[self.bound]


class OnePixel(nn.Module):
    """A classifier that reads one pixel of each NHWC uint8 image: next to no compute, so a classify run with it
    is bound by the decode on any machine (`--model one_pixel`), and shows how close the pipeline gets to the
    decode ceiling where no GPU takes the forward off the CPU."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)

    def forward(self, images):
        return self.fc(images[:, 0, 0, :].to(self.fc.weight.dtype))


def classifier(model: str) -> Callable[[str, str, int], InferenceTask]:
    """make_task for the classify scenarios with `model`: torchvision:<name> or one_pixel."""

    def make_task(decode: str, output_dir: str, width: int) -> InferenceTask:
        if model == "one_pixel":
            return image_classifier("one_pixel", OnePixel, [f"class_{i}" for i in range(1000)], image_size=224,
                                    top_k=5, decode=decode)
        return resolve_task(model, top_k=5, decode=decode)

    return make_task


_resnet50 = classifier("torchvision:resnet50")


class LightConvNet(nn.Module):
    """Five 3x3 convolutions at full resolution (3 → 64 → 64 → 64 → 64 → 3), with a residual: about 80 GFLOP
    per 512² image, so forward alone runs a few thousand images/s on an H100 and the copies matter."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(3):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return (x + self.body(x)).clamp(0, 1)


def _light_conv(decode: str, output_dir: str, width: int) -> InferenceTask:
    return image_to_image("light_conv", LightConvNet, output_dir, image_size=width, output_format="npy")


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("classify-cpu-decode", ("jpeg", 500, 375), _resnet50, decode="cpu", bound="cpu_decode_or_forward",
             targets=(Target("beam_infer / CPU decode ceiling", RATIO, 0.95),
                      Target("beam_infer / runinference", _times_runinference, 10.0), *SPDL_TARGETS)),
    Scenario("classify-gpu-decode", ("jpeg", 500, 375), _resnet50, decode="device", bound="decode_and_forward",
             targets=(Target("beam_infer / (1 / (1/decode + 1/forward))", RATIO, 0.90),
                      Target("beam_infer images/s on an H100", _on_h100, 7000.0),
                      Target("GPU utilisation % (beam_infer)", GPU_UTIL, 95.0), *SPDL_TARGETS)),
    Scenario("img2img", ("npy", 512, 512), _light_conv, decode="cpu", bound="forward_only", default_items=2048,
             targets=(Target("beam_infer / forward only", RATIO, 0.90),
                      Target("GPU utilisation % (beam_infer)", GPU_UTIL, 95.0), *SPDL_TARGETS)),
)}
