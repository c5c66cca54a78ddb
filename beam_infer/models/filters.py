"""Fixed-kernel image filters as image-to-image models: nothing to download, nothing to train.

Each maps float NCHW RGB images in [0, 1] to images of the same size and range, as one depthwise convolution
(a separable Gaussian, one kernel per channel) with reflected borders, so an edge pixel is not darkened by zero
padding. `beam_infer.tasks.img2img.UInt8ImageToImage` adapts them to the engine's uint8 NHWC batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_SIGMA = 1.0  # pixels: a blur that shows at 128² yet keeps the shapes' edges
_RADIUS = 2  # a 5x5 kernel: the Gaussian beyond 2 sigma is under 2% of its sum
_AMOUNT = 1.5  # unsharp mask: how much of (image - blur) is added back; 1-2 is the usual range


def gaussian_kernel(sigma: float = _SIGMA, radius: int = _RADIUS) -> torch.Tensor:
    """A (2 * radius + 1)² Gaussian kernel whose weights sum to 1."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


class GaussianBlur(nn.Module):
    """A Gaussian blur of each channel (depthwise convolution, reflected borders)."""

    def __init__(self, sigma: float = _SIGMA, radius: int = _RADIUS, channels: int = 3) -> None:
        super().__init__()
        self.radius = radius
        kernel = gaussian_kernel(sigma, radius).expand(channels, 1, 2 * radius + 1, 2 * radius + 1)
        self.register_buffer("kernel", kernel.contiguous())  # follows the engine's .to(device, dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r = self.radius
        padded = F.pad(images, (r, r, r, r), mode="reflect")
        return F.conv2d(padded, self.kernel.to(images.dtype), groups=images.shape[1])


class UnsharpMask(nn.Module):
    """Sharpens: image + amount * (image - blur(image)), clamped to [0, 1]."""

    def __init__(self, amount: float = _AMOUNT, sigma: float = _SIGMA, radius: int = _RADIUS) -> None:
        super().__init__()
        self.amount = amount
        self.blur = GaussianBlur(sigma, radius)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.amount * (images - self.blur(images))).clamp(0, 1)


FILTERS: dict[str, type[nn.Module]] = {"unsharp": UnsharpMask, "blur": GaussianBlur}
