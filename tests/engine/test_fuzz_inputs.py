"""1,000 generated bad (and odd) image files through the engine with the classify task: each one comes back, once, as
a prediction or a dead letter, within a time bound; the engine keeps running; memory stays bounded; PIL's
decompression-bomb limit stays as it is. The seed corpus is generated here (PIL), nothing is downloaded; hypothesis
mutates it (truncations, bit flips, zeroed runs, splices, junk), adds random bytes and crafted headers that declare
huge dimensions, with a fixed seed so that CI runs the same 1,000 cases every time."""

from __future__ import annotations

import collections
import ctypes
import gc
import io
import itertools
import struct
import time
import zlib

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from beam_infer.config import EngineConfig
from beam_infer.engine import Engine
from beam_infer.tasks.classify import shapes_classifier

pytestmark = pytest.mark.timeout(600)
CASES = 1000
CASE_LIMIT_S = 10.0  # one file's decode, forward and postprocess; a hang fails the case, named
PEAK_GROWTH_LIMIT_MB = 1500  # the peak RSS over the 1,000 files, above the RSS before them
LEAK_LIMIT_MB = 300  # what may stay after them (allocators keep some)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, mode: int = 2, pixels: bytes = b"\0" * 64) -> bytes:
    """A PNG whose header (valid CRCs) declares width x height (colour type `mode`), with little data behind."""
    header = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(pixels))
            + _png_chunk(b"IEND", b""))


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """`jpeg` with its frame header (SOF0/SOF2) claiming width x height."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]
    return jpeg


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.linear_gradient("L").resize(size).convert(mode)


def seed_corpus() -> dict[str, bytes]:
    """Good files of every mode the issue names, each small; mutations of them make the bad ones."""
    rgb = Image.merge("RGB", [_gradient("L", (96, 72)), _gradient("L", (96, 72)).rotate(90, expand=False),
                              Image.new("L", (96, 72), 80)])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    frames = [Image.new("P", (40, 30), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "rgb.jpg": _encode(rgb, "JPEG", quality=85),
        "progressive.jpg": _encode(rgb, "JPEG", progressive=True),
        "grey.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "exif-rotated.jpg": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "rgb.png": _encode(rgb, "PNG"),
        "1bit.png": _encode(rgb.convert("1"), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "16bit.png": _encode(_gradient("I;16", (64, 48)), "PNG"),
        "la.png": _encode(rgb.convert("LA"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "animated.gif": gif.getvalue(),
        "bomb.png": png_declaring(20_000, 20_000, mode=0),  # 400 M pixels: past twice PIL's limit
        "tiny.png": _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
    }


SEEDS = seed_corpus()
_SEED_NAMES = sorted(SEEDS)


@st.composite
def bad_files(draw) -> tuple[str, bytes]:
    """(how it was made, the bytes)."""
    kind = draw(st.sampled_from(["seed", "truncated", "bit-flipped", "zeroed", "spliced", "junk-appended",
                                 "random", "huge-png", "huge-jpeg", "empty"]))
    name = draw(st.sampled_from(_SEED_NAMES))
    data = SEEDS[name]
    if kind == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "bit-flipped":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 16))):
            flipped[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    elif kind == "zeroed":
        start = draw(st.integers(0, len(data) - 1))
        data = data[:start] + b"\0" * draw(st.integers(1, 256)) + data[start + 256:]
    elif kind == "spliced":
        other = SEEDS[draw(st.sampled_from(_SEED_NAMES))]
        data = data[:draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))):]
    elif kind == "junk-appended":
        data = data + draw(st.binary(min_size=1, max_size=512))
    elif kind == "random":
        name, data = "-", draw(st.binary(max_size=4096))
    elif kind == "huge-png":
        side = st.integers(1, 2**31 - 1)
        name, data = "-", png_declaring(draw(side), draw(side), mode=draw(st.sampled_from([0, 2, 3, 4, 6])))
    elif kind == "huge-jpeg":
        side = st.integers(1, 65535)
        name, data = "rgb.jpg", jpeg_declaring(SEEDS["rgb.jpg"], draw(side), draw(side))
    elif kind == "empty":
        name, data = "-", b""
    return f"{kind}:{name}", data


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _trimmed_rss_mb() -> float:
    """VmRSS after a garbage collection and glibc's malloc_trim: what is still held, not what the allocator keeps
    for reuse."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_mb("VmRSS")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux)


@pytest.fixture
def engine():
    engine = Engine(shapes_classifier(), EngineConfig(device="cpu", batch_size=8, max_batch_wait_s=0.01)).retain()
    yield engine
    engine.release()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(params=["torch-threads-1", "torch-threads-default"])
def decode_path(request):
    """Both JPEG paths of decode_resize: with one torch thread (as on CUDA workers) JPEGs go through torchvision's
    decoder first; with more, through PIL alone."""
    threads = torch.get_num_threads()
    if request.param == "torch-threads-1":
        torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(threads)


def test_every_bad_file_is_a_prediction_or_a_dead_letter_in_bounded_time_and_memory(engine, folder, decode_path):
    bomb_limit = Image.MAX_IMAGE_PIXELS
    runs_before = engine.runs_started
    numbers = itertools.count()
    outcomes: collections.Counter[str] = collections.Counter()
    slowest = [0.0]
    rss_before = _trimmed_rss_mb()
    _reset_peak_rss()

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=bad_files())
    def run_one(case):
        how, data = case
        n = next(numbers)
        path = folder / f"{n}.bin"
        path.write_bytes(data)
        bundle = engine.open_bundle()
        start = time.monotonic()
        bundle.submit({"id": f"case-{n}", "uri": str(path)})
        results = []
        while not results:  # polled, so that a hang fails this case by name instead of the whole test
            assert time.monotonic() - start < CASE_LIMIT_S, f"{how} ({len(data)} bytes): no result in {CASE_LIMIT_S}s"
            results += bundle.poll()
            time.sleep(0.001)
        results += list(bundle.drain())
        slowest[0] = max(slowest[0], time.monotonic() - start)
        path.unlink()
        assert [r.record["id"] for r in results] == [f"case-{n}"], (how, results)
        (result,) = results
        assert (result.value is None) != (result.failure is None), (how, result)
        if result.failure is not None:
            assert result.failure.stage in ("fetch", "preprocess"), (how, result.failure)
            assert result.failure.error_type != "MemoryError", (how, result.failure)
            outcomes[f"dead letter ({result.failure.stage}, {result.failure.error_type})"] += 1
        else:
            assert len(result.value["top_labels"]) == 3, (how, result.value)
            outcomes["prediction"] += 1
        assert engine.running and engine.runs_started == runs_before  # the same run of the engine throughout

    run_one()
    peak = _status_mb("VmHWM")
    after = _trimmed_rss_mb()
    assert sum(outcomes.values()) >= CASES
    assert outcomes["prediction"] > 0 and sum(v for k, v in outcomes.items() if k != "prediction") > CASES // 2
    assert Image.MAX_IMAGE_PIXELS == bomb_limit  # PIL's bomb limit kept
    assert peak - rss_before < PEAK_GROWTH_LIMIT_MB, (rss_before, peak)
    assert after - rss_before < LEAK_LIMIT_MB, (rss_before, after)
    print(f"\n{decode_path}: {sum(outcomes.values())} fuzzed files, slowest {slowest[0]:.2f}s, RSS {rss_before:.0f} MB "
          f"before, peak {peak:.0f}, after {after:.0f}: {dict(outcomes.most_common())}")
