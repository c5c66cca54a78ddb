"""The jobs gs:// → gs:// against a GCS server on loopback (fake-gcs-server) behind a proxy that injects faults:
503, 429, dropped connections and slow bodies, on every request (the engine's, and Beam's own writes)."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from beam_infer.models.shapes_net import WEIGHTS_PATH
from beam_infer.sample import write_sample
from pipelines import run

pytestmark = pytest.mark.timeout(240)

IMAGES = 24


def _faults(rate):
    """`rate` of the requests faulted, a quarter each: 503, 429, a dropped connection, a slow body."""
    return dict(error_503=rate / 4, error_429=rate / 4, drop=rate / 4, slow_body=rate / 4, slow_body_s=0.2)


def _upload_sample(gcs, tmp_path, count=IMAGES):
    """The built-in sample's JPEGs under gs://bucket/in/, and a manifest of them with their ids."""
    write_sample(str(tmp_path / "sample"), count)
    ids = []
    for path in sorted((tmp_path / "sample").glob("*.jpg")):
        gcs.upload(f"in/{path.name}", path.read_bytes())
        ids.append(path.stem)
    return ids


def _rows(gcs, name):
    tables = [pq.read_table(io.BytesIO(gcs.download(key))) for key in gcs.list("out/") if
              key.rsplit("/", 1)[-1].startswith(f"{name}-") and key.endswith(".parquet")]
    return [row for table in tables for row in table.to_pylist()]


def _uris(gcs, ids):
    return {gcs.url_of(f"in/{rid}.jpg") for rid in ids}


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3])
def test_classify_gs_to_gs_accounts_for_every_image_exactly_once_under_faults(gcs, tmp_path, rate):
    ids = _upload_sample(gcs, tmp_path)
    gcs.proxy.configure(seed=1, **_faults(rate))
    summary = run.main(["--input", gcs.url_of("in/*.jpg"), "--output", gcs.url_of("out"), "--batch-size", "8"])
    predictions, dead = _rows(gcs, "predictions"), _rows(gcs, "dead_letters")
    seen = [r["uri"] for r in predictions] + [d["uri"] for d in dead]
    assert sorted(seen) == sorted(_uris(gcs, ids)), "every input once, in the predictions or the dead letters"
    assert summary.get("records") == IMAGES
    if rate == 0.0:
        assert dead == [] and summary.get("fetch_retries") == 0 and gcs.proxy.counts["requests"] > IMAGES
    if rate == 0.3:
        assert summary.get("fetch_retries") > 0


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3])
def test_img2img_gs_to_gs_puts_an_image_per_record_and_indexes_it_under_faults(gcs, tmp_path, rate):
    ids = _upload_sample(gcs, tmp_path)
    gcs.proxy.configure(seed=2, **_faults(rate))
    summary = run.main(["--task", "img2img", "--input", gcs.url_of("in/*.jpg"), "--output", gcs.url_of("out"),
                        "--batch-size", "8", "--image-size", "32"])
    index, dead = _rows(gcs, "index"), _rows(gcs, "dead_letters")
    assert sorted([r["uri"] for r in index] + [d["uri"] for d in dead]) == sorted(_uris(gcs, ids))
    written = set(gcs.list("out/images/"))
    for row in index:
        key = row["output_uri"].removeprefix(f"gs://{gcs.bucket}/")
        assert key in written and key.startswith("out/images/")
        image = np.asarray(Image.open(io.BytesIO(gcs.download(key))))
        assert image.shape == (row["height"], row["width"], 3) == (32, 32, 3)
    assert len(written) == len(index), "no object but the indexed ones (nothing partial)"
    if rate == 0.0:
        assert dead == [] and summary.get("put_retries") == 0
    if rate == 0.3:
        assert summary.get("fetch_retries") + summary.get("put_retries") > 0


def test_a_missing_object_is_a_fetch_dead_letter_with_404_and_no_retry(gcs, tmp_path):
    ids = _upload_sample(gcs, tmp_path, 4)
    manifest = "\n".join(f'{{"id": "{rid}", "uri": "{gcs.url_of(f"in/{rid}.jpg")}"}}' for rid in [*ids, "gone"])
    gcs.upload("manifest.jsonl", manifest.encode())
    summary = run.main(["--input", gcs.url_of("manifest.jsonl"), "--output", gcs.url_of("out")])
    (dead,) = _rows(gcs, "dead_letters")
    assert dead["id"] == "gone" and dead["stage"] == "fetch" and "HTTP 404" in dead["message"]
    assert "not retried" in dead["message"]
    assert summary.get("fetch_failures") == 1 and summary.get("fetch_retries") == 0
    assert len(_rows(gcs, "predictions")) == 4


def test_model_weights_are_read_from_gs_with_weights_only(gcs, tmp_path):
    _upload_sample(gcs, tmp_path, 8)
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    state["head.weight"].zero_()  # every class scores the same: the job shows it used these weights
    state["head.bias"].zero_()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    gcs.upload("models/flat.pt", buffer.getvalue())
    summary = run.main(["--input", gcs.url_of("in/*.jpg"), "--output", gcs.url_of("out"),
                        "--weights", gcs.url_of("models/flat.pt")])
    rows = _rows(gcs, "predictions")
    assert summary.get("predictions") == 8 and len(rows) == 8
    assert all(abs(score - 1 / 8) < 1e-4 for row in rows for score in row["top_scores"])
    # A checkpoint that is not plain tensors is refused by weights_only=True.
    buffer = io.BytesIO()
    torch.save({"state": _NotATensor()}, buffer)
    gcs.upload("models/pickled.pt", buffer.getvalue())
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        run.main(["--input", gcs.url_of("in/*.jpg"), "--output", gcs.url_of("out2"),
                  "--weights", gcs.url_of("models/pickled.pt")])


class _NotATensor:
    pass
