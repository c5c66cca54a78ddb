import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from beam_infer.sample import encode, render
from beam_infer.tasks import classify
from beam_infer.tasks.classify import decode_resize, decode_resize_batch, encoded_jpeg, jpeg_size, shapes_classifier

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_resize_gives_rgb_uint8_of_the_asked_size(fmt):
    array = decode_resize(encode(render(3, 1)[1], fmt), 64)
    assert array.shape == (64, 64, 3) and array.dtype.name == "uint8"


def _pil_decode_resize(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


@pytest.fixture
def one_torch_thread(monkeypatch):
    """As on a CUDA worker, where the engine gives torch's CPU ops one thread (configure_process)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)


@pytest.fixture
def torch_path_calls(monkeypatch):
    calls = []
    real = classify._decode_resize_jpeg
    monkeypatch.setattr(classify, "_decode_resize_jpeg", lambda data, size: calls.append(size) or real(data, size))
    return calls


@pytest.mark.parametrize("size", [48, 64, 224])  # down- and upsampling (the image is 64-128 px a side)
def test_the_torch_path_gives_the_pixels_pil_gives_within_one_level(size, one_torch_thread, torch_path_calls):
    data = encode(render(3, 1)[1], "JPEG")
    ours = decode_resize(data, size).astype(int)
    assert torch_path_calls == [size] and ours.shape == (size, size, 3)
    assert np.abs(ours - _pil_decode_resize(data, size)).max() <= 1


def test_with_several_torch_threads_pil_decodes_so_no_decode_thread_starts_an_openmp_team(monkeypatch,
                                                                                         torch_path_calls):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert decode_resize(encode(render(3, 1)[1], "JPEG"), 64).shape == (64, 64, 3) and torch_path_calls == []


def test_a_jpeg_large_enough_for_a_reduced_scale_decode_goes_to_pil(one_torch_thread, torch_path_calls):
    out = io.BytesIO()
    Image.new("RGB", (300, 260), (200, 10, 10)).save(out, "JPEG")
    assert decode_resize(out.getvalue(), 128).shape == (128, 128, 3) and torch_path_calls == []
    assert decode_resize(out.getvalue(), 140).shape == (140, 140, 3) and torch_path_calls == [140]


def test_a_decompression_bomb_is_refused_by_pil_on_either_path(monkeypatch, one_torch_thread, torch_path_calls):
    out = io.BytesIO()
    Image.new("RGB", (50, 40), (0, 0, 0)).save(out, "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 2,000 pixels: past twice the limit
    with pytest.raises(Image.DecompressionBombError):
        decode_resize(out.getvalue(), 16)
    assert torch_path_calls == []


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_come_out_rgb(mode, one_torch_thread, torch_path_calls):
    out = io.BytesIO()
    Image.new(mode, (50, 40), 128 if mode == "L" else (10, 20, 30, 0)).save(out, "JPEG")
    assert np.abs(decode_resize(out.getvalue(), 32).astype(int) - _pil_decode_resize(out.getvalue(), 32)).max() <= 1
    assert torch_path_calls == [32]


def test_a_jpeg_cut_short_gets_pils_error(one_torch_thread, torch_path_calls):
    data = encode(render(5, 0)[1])
    with pytest.raises(OSError, match="truncated"):
        decode_resize(data[: len(data) // 3], 64)
    assert torch_path_calls == [64]  # libjpeg refused it first


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_size_reads_the_frame_header(progressive):
    out = io.BytesIO()
    Image.new("RGB", (321, 123), (1, 2, 3)).save(out, "JPEG", progressive=progressive)
    assert jpeg_size(out.getvalue()) == (321, 123)
    assert jpeg_size(b"\xff\xd8\xff\xe0" + bytes(64)) is None


def test_empty_bytes_are_a_clear_error():
    with pytest.raises(ValueError, match="0 bytes"):
        decode_resize(b"", 64)


def test_device_decode_reads_a_batch_of_jpegs_of_different_sizes_into_one_uint8_nhwc_batch():
    encoded = [torch.from_numpy(encoded_jpeg(encode(render(7, i)[1]))) for i in range(5)]
    assert len({tuple(decode_jpeg(e).shape) for e in encoded}) > 1  # the sample's images differ in size
    batch = decode_resize_batch(encoded, torch.device("cpu"), 64)
    assert batch.shape == (5, 64, 64, 3) and batch.dtype == torch.uint8
    for i, e in enumerate(encoded):  # the same image decoded and resized alone
        assert torch.equal(batch[i], decode_resize_batch([e], torch.device("cpu"), 64)[0])


def test_device_decode_agrees_with_pil_decode_within_resize_differences():
    data = encode(render(7, 3)[1])
    on_device = decode_resize_batch([torch.from_numpy(encoded_jpeg(data))], torch.device("cpu"), 64)[0]
    pil = torch.tensor(decode_resize(data, 64))
    assert (on_device.float() - pil.float()).abs().mean() < 8  # PIL's draft mode and antialias differ a little


@pytest.mark.parametrize("data, message", [(b"", "0 bytes"), (b"\x89PNG\r\n", "not a JPEG")])
def test_device_decode_rejects_empty_and_non_jpeg_bytes_before_the_batch(data, message):
    with pytest.raises(ValueError, match=message):
        encoded_jpeg(data)


def test_unknown_decode_place_is_a_clear_error():
    with pytest.raises(ValueError, match="decode must be one of"):
        shapes_classifier(decode="gpu")
