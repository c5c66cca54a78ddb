"""ShapesNet: the small CNN that ships with beam_infer and classifies the generated shapes.

It takes uint8 images in NHWC layout, the layout the engine ships over PCIe, and normalises on the device.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from beam_infer.sample import SHAPE_CLASSES

INPUT_SIZE = 64  # pixels a side; the preprocess resizes every image to this
WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "shapes_net.pt")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ShapesNet(nn.Module):
    """Four conv blocks and a linear head over global average pooling; about 70k parameters."""

    def __init__(self, num_classes: int = len(SHAPE_CLASSES)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(127.5))
        self.register_buffer("scale", torch.tensor(1 / 64.0))
        self.features = nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 64), _block(64, 64))
        self.head = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Returns logits for a uint8 batch of shape (N, H, W, 3)."""
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype)  # NCHW view with channels_last strides
        x = (x - self.mean) * self.scale
        x = self.features(x).mean(dim=(2, 3))
        return self.head(x)


def load_shapes_net(path: str = WEIGHTS_PATH) -> ShapesNet:
    """Loads the shipped weights (a state_dict read with weights_only=True) into an eval-mode ShapesNet."""
    model = ShapesNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
