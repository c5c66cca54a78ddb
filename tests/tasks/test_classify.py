import pytest

from beam_infer.sample import encode, render
from beam_infer.tasks.classify import decode_resize

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_resize_gives_rgb_uint8_of_the_asked_size(fmt):
    array = decode_resize(encode(render(3, 1)[1], fmt), 64)
    assert array.shape == (64, 64, 3) and array.dtype.name == "uint8"


def test_empty_bytes_are_a_clear_error():
    with pytest.raises(ValueError, match="0 bytes"):
        decode_resize(b"", 64)
