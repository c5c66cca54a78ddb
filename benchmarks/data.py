"""Benchmark inputs, generated once and cached: photo-like JPEGs, or raw uint8 `.npy` images.

The files of a dataset depend only on (kind, size, count), so every competitor of a run, and every later run,
reads the same bytes. The cache lives in $BEAM_INFER_CACHE (default ~/.cache/beam_infer)/benchmarks.
"""

from __future__ import annotations

import functools
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

_SEED = 20261127
_VERSION = "v2"  # bump when the generator changes, so no cache of older files is read as the new ones
_JPEG_QUALITY = 90
_GRAIN_MARGIN = 64


def cache_root() -> str:
    return os.path.join(os.environ.get("BEAM_INFER_CACHE", os.path.expanduser("~/.cache/beam_infer")), "benchmarks")


@functools.lru_cache(maxsize=4)
def _grain(width: int, height: int) -> np.ndarray:
    """Fine grain, drawn once per size; each image takes its own window of it (drawing per image is slow)."""
    rng = np.random.default_rng(_SEED)
    return np.clip(rng.normal(0, 8, size=(height + _GRAIN_MARGIN, width + _GRAIN_MARGIN, 3)), -127, 127).astype(np.int8)


def _photo_like(index: int, width: int, height: int) -> np.ndarray:
    """A smooth random field plus fine grain: compresses like a photo (tens of KB per 500x375 JPEG)."""
    rng = np.random.default_rng((_SEED, index))
    coarse = rng.integers(0, 256, size=(height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    dy, dx = rng.integers(0, _GRAIN_MARGIN, size=2)
    grain = _grain(width, height)[dy:dy + height, dx:dx + width]
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def _write_jpeg(path: str, index: int, width: int, height: int) -> None:
    out = io.BytesIO()
    Image.fromarray(_photo_like(index, width, height)).save(out, format="JPEG", quality=_JPEG_QUALITY)
    with open(path, "wb") as f:
        f.write(out.getvalue())


def _write_npy(path: str, index: int, width: int, height: int) -> None:
    np.save(path, _photo_like(index, width, height), allow_pickle=False)


def _write_number(path: str, index: int, width: int, height: int) -> None:
    with open(path, "wb") as f:
        f.write(np.float32(index).tobytes())  # 4 bytes: for measuring per-record overhead


_WRITERS = {"jpeg": (_write_jpeg, "jpg"), "npy": (_write_npy, "npy"), "number": (_write_number, "bin")}


def dataset(kind: str, width: int, height: int, count: int) -> str:
    """Generates (once) `count` files of `kind` ("jpeg", "npy" or "number") and returns their manifest (JSON lines).

    The manifest lists one record per file: {"id": "img-00000", "uri": "/abs/path/00000.jpg"}.
    """
    write, suffix = _WRITERS[kind]
    folder = os.path.join(cache_root(), f"{_VERSION}-{kind}-{width}x{height}-{count}")
    manifest = os.path.join(folder, "manifest.jsonl")
    if os.path.exists(manifest):
        return manifest
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i:05d}.{suffix}") for i in range(count)]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # PIL and zlib release the GIL
        list(pool.map(lambda i: write(paths[i], i, width, height), range(count)))
    tmp = manifest + ".tmp"
    with open(tmp, "w") as f:
        for i, path in enumerate(paths):
            f.write(json.dumps({"id": f"img-{i:05d}", "uri": path}) + "\n")
    os.replace(tmp, manifest)  # a manifest exists only for a complete dataset
    return manifest


def read_records(manifest: str) -> list[dict]:
    with open(manifest) as f:
        return [json.loads(line) for line in f]
