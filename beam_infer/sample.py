"""Procedurally generated images of coloured shapes: the built-in sample and the shipped model's data.

Every image is a function of (seed, index), so the training set, the held-out set and the job's sample are
reproducible and disjoint by seed.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "plus", "ring", "diamond", "star", "frame",
)

_MIN_CONTRAST = 90  # summed RGB distance between shape and background, so every shape is visible
_NOISE_STD = 6.0  # per-pixel Gaussian noise, so the model cannot key on flat colour


@dataclass(frozen=True)
class ShapeImage:
    """One generated image: its encoded bytes and its class."""

    index: int
    label: str
    data: bytes


def _colour_pair(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    while True:
        fg = rng.integers(0, 256, size=3)
        bg = rng.integers(0, 256, size=3)
        if np.abs(fg - bg).sum() >= _MIN_CONTRAST * 2:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _polygon(cx: float, cy: float, radius: float, angles_deg: list[float]) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles_deg]


def _draw(draw: ImageDraw.ImageDraw, label: str, cx: float, cy: float, r: float, tilt: float, fg) -> None:
    if label == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif label == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    elif label == "square":
        draw.polygon(_polygon(cx, cy, r * 1.25, [45 + tilt + 90 * k for k in range(4)]), fill=fg)
    elif label == "frame":
        pts = _polygon(cx, cy, r * 1.25, [45 + tilt + 90 * k for k in range(4)])
        draw.line(pts + pts[:1], fill=fg, width=max(2, int(r * 0.3)), joint="curve")
    elif label == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.2, [tilt + 90 * k for k in range(4)]), fill=fg)
    elif label == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.15, [-90 + tilt + 120 * k for k in range(3)]), fill=fg)
    elif label == "star":
        radii = [r * 1.15 if k % 2 == 0 else r * 0.45 for k in range(10)]
        angles = [-90 + tilt + 36 * k for k in range(10)]
        draw.polygon([(cx + q * math.cos(math.radians(a)), cy + q * math.sin(math.radians(a)))
                      for q, a in zip(radii, angles, strict=True)], fill=fg)
    elif label == "plus":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    else:
        raise ValueError(f"unknown shape {label!r}")


def render(seed: int, index: int, *, label: str | None = None) -> tuple[str, Image.Image]:
    """Draws image `index` of the stream `seed`: a random shape, size, place, tilt, colours and noise.

    Returns:
        (label, image): the class drawn and an RGB image of a random size between 64 and 128 pixels a side.
    """
    rng = np.random.default_rng([seed, index])
    label = label or SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
    width, height = (int(v) for v in rng.integers(64, 129, size=2))
    fg, bg = _colour_pair(rng)
    side = min(width, height)
    r = float(rng.uniform(0.2, 0.38)) * side
    cx = float(rng.uniform(r * 1.3, width - r * 1.3))
    cy = float(rng.uniform(r * 1.3, height - r * 1.3))
    tilt = float(rng.uniform(-12, 12))
    image = Image.new("RGB", (width, height), bg)
    _draw(ImageDraw.Draw(image), label, cx, cy, r, tilt, fg)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, _NOISE_STD, size=(height, width, 3))
    return label, Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """Encodes an image as JPEG (quality 90) or PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90) if fmt == "JPEG" else image.save(buf, format=fmt)
    return buf.getvalue()


def generate(seed: int, count: int, fmt: str = "JPEG") -> list[ShapeImage]:
    """Generates `count` encoded images of the stream `seed`."""
    out = []
    for i in range(count):
        label, image = render(seed, i)
        out.append(ShapeImage(i, label, encode(image, fmt)))
    return out


def write_sample(directory: str, count: int, seed: int = 20261127) -> str:
    """Writes `count` JPEGs and a JSONL manifest (id, uri, label) into `directory`.

    Returns:
        The manifest's path.
    """
    os.makedirs(directory, exist_ok=True)
    manifest = os.path.join(directory, "manifest.jsonl")
    with open(manifest, "w") as f:
        for item in generate(seed, count):
            path = os.path.join(directory, f"shape-{item.index:05d}.jpg")
            with open(path, "wb") as img:
                img.write(item.data)
            f.write(json.dumps({"id": f"shape-{item.index:05d}", "uri": path, "label": item.label}) + "\n")
    return manifest
