import pytest
import torch
from torch import nn

from beam_infer.models import resolve_img2img_task
from beam_infer.models.filters import GaussianBlur, UnsharpMask, gaussian_kernel
from beam_infer.tasks.img2img import UInt8ImageToImage

pytestmark = pytest.mark.timeout(60)


def _images(n=2, size=24):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_gaussian_kernel_sums_to_one_and_is_symmetric():
    kernel = gaussian_kernel(1.0, 2)
    assert kernel.shape == (5, 5) and torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert torch.equal(kernel, kernel.T) and torch.equal(kernel, kernel.flip(0))


@pytest.mark.parametrize("model", [UnsharpMask(), GaussianBlur()], ids=["unsharp", "blur"])
def test_filters_keep_the_size_and_range_and_leave_a_flat_image_flat(model):
    x = _images()
    y = model(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    flat = torch.full((1, 3, 9, 13), 0.25)
    torch.testing.assert_close(model(flat), flat)  # reflected borders: no dark edge


def test_blur_smooths_and_unsharp_mask_sharpens():
    x = _images()
    detail = (x - GaussianBlur()(x)).abs().mean()
    assert (GaussianBlur()(x) - GaussianBlur()(GaussianBlur()(x))).abs().mean() < detail
    sharpened = UnsharpMask()(x)
    assert (sharpened - GaussianBlur()(sharpened)).abs().mean() > detail


def test_uint8_adapter_runs_a_filter_on_nhwc_bytes_in_bfloat16():
    images = (torch.rand(2, 16, 16, 3) * 255).to(torch.uint8)
    model = UInt8ImageToImage(UnsharpMask()).to(torch.bfloat16)
    out = model(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape


def test_filters_are_resolved_by_name():
    task = resolve_img2img_task("unsharp", "/tmp/out", 32)
    assert task.name == "unsharp" and isinstance(task.load_model().model, UnsharpMask)
    assert isinstance(resolve_img2img_task("blur", "/tmp/out", 32).load_model().model, GaussianBlur)


def make_identity() -> nn.Module:
    return nn.Identity()


def test_module_function_names_a_model_factory():
    task = resolve_img2img_task(f"{__name__}:make_identity", "/tmp/out", 32, output_format="npy")
    assert task.name == f"{__name__}:make_identity" and isinstance(task.load_model().model, nn.Identity)


@pytest.mark.parametrize("spec, match", [("sharpen", "unknown --model"), (f"{__name__}:missing", "no function")])
def test_an_unknown_model_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_img2img_task(spec, "/tmp/out", 32)
