import numpy as np
import pytest
import torch
from PIL import Image

from beam_infer import EngineConfig
from beam_infer.engine import Engine
from beam_infer.tasks.img2img import image_to_image
from benchmarks.scenarios import LightConvNet

pytestmark = pytest.mark.timeout(60)


class _Invert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.one - x


def _run(task, records):
    engine = Engine(task, EngineConfig(device="cpu", batch_size=4)).retain()
    bundle = engine.open_bundle()
    for r in records:
        bundle.submit(r)
    results = {r.record["id"]: r for r in bundle.drain()}
    engine.release()
    return results


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_each_output_image_is_written_where_its_row_says(tmp_path, fmt):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    records = []
    for i, image in enumerate(images):
        np.save(tmp_path / f"{i}.npy", image)
        records.append({"id": f"im/{i}", "uri": str(tmp_path / f"{i}.npy")})
    out = tmp_path / "out"
    out.mkdir()
    results = _run(image_to_image("invert", _Invert, str(out), image_size=32, output_format=fmt), records)
    for i, image in enumerate(images):
        value = results[f"im/{i}"].value
        assert value["output_uri"] == f"{out}/im%2F{i}.{fmt}"
        data = open(value["output_uri"], "rb").read()
        assert value["output_bytes"] == len(data)
        written = np.load(value["output_uri"]) if fmt == "npy" else np.asarray(Image.open(value["output_uri"]))
        np.testing.assert_array_equal(written, 255 - image)  # uint8 in, [0, 1] floats in the model, uint8 out


def test_an_array_of_the_wrong_shape_is_a_preprocess_failure(tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((8, 8, 3), np.uint8))
    np.save(tmp_path / "ok.npy", np.zeros((16, 16, 3), np.uint8))
    results = _run(image_to_image("conv", LightConvNet, str(tmp_path), image_size=16),
                   [{"id": "small", "uri": str(tmp_path / "small.npy")}, {"id": "ok", "uri": str(tmp_path / "ok.npy")}])
    assert results["small"].failure.stage == "preprocess" and "(16, 16, 3)" in results["small"].failure.message
    assert results["ok"].failure is None and results["ok"].value["output_bytes"] > 16 * 16 * 3


def test_unknown_output_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="output_format"):
        image_to_image("x", _Invert, str(tmp_path), image_size=8, output_format="gif")
