import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from beam_infer import EngineConfig
from beam_infer.engine import Engine
from beam_infer.io.put import object_uri
from beam_infer.task import Blob
from beam_infer.tasks.img2img import IMAGE_TO_IMAGE_SCHEMA, image_to_image
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


def _read(uri, fmt):
    return np.load(uri) if fmt == "npy" else np.asarray(Image.open(uri))


def _write_inputs(directory, images, ids):
    directory.mkdir()
    records = []
    for i, (image, rid) in enumerate(zip(images, ids, strict=True)):
        np.save(directory / f"{i}.npy", image)
        records.append({"id": rid, "uri": str(directory / f"{i}.npy")})
    return records


def _images(n, size=32):
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_postprocess_returns_the_encoded_image_as_a_blob_named_after_the_record_id(tmp_path):
    image = _images(1, 8)[0]
    task = image_to_image("invert", _Invert, str(tmp_path / "out"), image_size=8)
    value = task.postprocess((image,), {"id": "a/b", "uri": "in/a.jpg"})
    blob = value["output_uri"]
    assert isinstance(blob, Blob) and blob.uri == object_uri(str(tmp_path / "out"), "a/b", ".png")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(blob.data))), image)
    assert (value["width"], value["height"]) == (8, 8)
    assert set(value) == set(IMAGE_TO_IMAGE_SCHEMA.names)


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_each_output_image_is_written_where_its_row_says(tmp_path, fmt):
    images = _images(6)
    ids = [f"im/{i}" for i in range(6)]
    records = _write_inputs(tmp_path / "in", images, ids)
    out = tmp_path / "out" / "images"  # not there yet: the put stage creates it
    results = _run(image_to_image("invert", _Invert, str(out), image_size=32, output_format=fmt), records)
    for rid, image in zip(ids, images, strict=True):
        assert results[rid].failure is None, results[rid].failure
        value = results[rid].value
        assert value["output_uri"] == object_uri(str(out), rid, f".{fmt}")
        assert (value["width"], value["height"]) == (32, 32)
        np.testing.assert_array_equal(_read(value["output_uri"], fmt), 255 - image)  # [0, 1] floats in the model
    assert sorted(os.listdir(out)) == sorted(os.path.basename(r.value["output_uri"]) for r in results.values())


def test_no_record_id_names_a_path_outside_the_output_directory(tmp_path):
    ids = ["../x", "/abs", "a/b", "nul\x00x", "ctrl\x07", ".hidden", "", "..", "a\\b"]
    images = _images(len(ids), 16)
    records = _write_inputs(tmp_path / "in", images, ids)
    out = tmp_path / "out"
    results = _run(image_to_image("invert", _Invert, str(out), image_size=16), records)
    uris = {}
    for record, image in zip(records, images, strict=True):
        result = results[record["id"]]
        assert result.failure is None, (record["id"], result.failure)
        uri = result.value["output_uri"]
        expected_id = record["id"] or record["uri"]  # an empty id falls back to the record's URI
        assert uri == object_uri(str(out), expected_id, ".png")
        assert os.path.dirname(os.path.realpath(uri)) == os.path.realpath(out)
        assert not os.path.basename(uri).startswith(".")
        np.testing.assert_array_equal(_read(uri, "png"), 255 - image)
        uris[record["id"]] = uri
    assert len(set(uris.values())) == len(ids)  # distinct ids, distinct objects
    # Everything written is one output per record, under its final name: no temporary file left, nothing else.
    assert sorted(os.listdir(out)) == sorted(os.path.basename(u) for u in uris.values())
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    assert sorted(os.listdir(tmp_path / "in")) == sorted(f"{i}.npy" for i in range(len(ids)))


def test_a_write_that_fails_is_a_put_dead_letter_and_the_others_are_written(tmp_path):
    (tmp_path / "blocked").write_bytes(b"a file where a directory should be")
    records = _write_inputs(tmp_path / "in", _images(2, 16), ["a", "b"])
    task = image_to_image("invert", _Invert, str(tmp_path / "blocked" / "images"), image_size=16)
    results = _run(task, records)
    assert {rid: r.failure.stage for rid, r in results.items()} == {"a": "put", "b": "put"}
    assert sorted(os.listdir(tmp_path)) == ["blocked", "in"]


def test_an_array_of_the_wrong_shape_is_a_preprocess_failure(tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((8, 8, 3), np.uint8))
    np.save(tmp_path / "ok.npy", np.zeros((16, 16, 3), np.uint8))
    results = _run(image_to_image("conv", LightConvNet, str(tmp_path / "out"), image_size=16),
                   [{"id": "small", "uri": str(tmp_path / "small.npy")}, {"id": "ok", "uri": str(tmp_path / "ok.npy")}])
    assert results["small"].failure.stage == "preprocess" and "(16, 16, 3)" in results["small"].failure.message
    assert results["ok"].failure is None and (results["ok"].value["width"], results["ok"].value["height"]) == (16, 16)
    assert os.path.exists(results["ok"].value["output_uri"])


def test_a_model_factory_that_returns_no_module_fails_clearly(tmp_path):
    task = image_to_image("bad", lambda: "not a model", str(tmp_path), image_size=8)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        task.load_model()


def test_unknown_output_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="output_format"):
        image_to_image("x", _Invert, str(tmp_path), image_size=8, output_format="gif")
