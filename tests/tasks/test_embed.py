"""The embed task against sentence-transformers' own encode(), and its failures."""

import hashlib
import json
import os

import numpy as np
import pytest

from beam_infer import EngineConfig
from beam_infer.engine import Engine
from beam_infer.tasks.embed import DEFAULT_EMBED_MODEL, model_directory, read_sentence_model, text_embedder
from beam_infer.text_sample import generated_texts
from tests.fakes import run_all

pytestmark = pytest.mark.timeout(120)
# The files as Hugging Face publishes them (sentence-transformers/all-MiniLM-L6-v2, revision 1110a243fdf4706b3f4…)
PUBLISHED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
LONG = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 176  # 10,032 characters
EDGE_CASES = [
    "", " ", "   \t\n  ", "a", "😀", "🚀🎉✅ emoji only and then words 👍🏽",
    "機械学習のモデルは大量のテキストを処理します",
    "我们在图形处理器上运行批量推理", "מערכת ההפעלה עובדת היטב", "مرحبا بالعالم هذا نص قصير", "Быстрая коричневая лиса",
    "mixed English and 日本語 and عربي in one line", "CAPITALS and lowercase ARE the same", "tab\tseparated\tvalues",
    "numbers 3.14159 2718 and symbols #$%&*()", "https://example.com/a/b?c=d&e=f", LONG, LONG[:1500],
]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_directory(DEFAULT_EMBED_MODEL)), device="cpu", local_files_only=True)


def embed(records, **config):
    engine = Engine(text_embedder(), EngineConfig(device="cpu", **config)).retain()
    try:
        return {r.record["id"]: r for r in run_all(engine, records)}
    finally:
        engine.release()


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_match_sentence_transformers_on_varied_texts(reference):
    texts = EDGE_CASES + generated_texts(190, seed=3, median_words=8, max_words=60)
    records = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    # small batches and a small budget: many batches of different widths, each padded to its own longest
    out = embed(records, batch_size=32, max_tokens=2048, bucket_batches=4, max_batch_wait_s=5.0)
    expected = reference.encode(texts, batch_size=32)
    lengths = [len(ids) for ids in reference.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    assert len(texts) >= 200 and sorted(out) == sorted(r["id"] for r in records)
    for i, text in enumerate(texts):
        result = out[f"r{i}"]
        assert result.failure is None
        embedding = result.value["embedding"]
        assert embedding.shape == (384,) and embedding.dtype == np.float32
        assert cosine(embedding, expected[i]) >= 0.999, text[:40]
        assert abs(np.linalg.norm(embedding) - 1) < 1e-4  # L2-normalised
        assert result.value["tokens"] == lengths[i]
        assert result.value["truncated"] == (text in (LONG, LONG[:1500])), text[:40]


def test_a_text_alone_and_beside_much_longer_texts_gets_the_same_embedding():
    text = "a short sentence about batching"
    alone = embed([{"id": "x", "text": text}], batch_size=1)["x"].value["embedding"]
    records = [{"id": "x", "text": text}] + [{"id": f"long{i}", "text": LONG[i:]} for i in range(3)]
    # one batch of four, padded to 256 tokens: the short text's padding must be masked out
    beside = embed(records, batch_size=4, bucket_batches=1, max_batch_wait_s=30.0)["x"].value["embedding"]
    np.testing.assert_allclose(beside, alone, atol=2e-5)


def test_non_string_missing_and_undecodable_texts_are_dead_letters_naming_the_field(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("a text in a file", encoding="utf-8")
    bad.write_bytes(b"\xff\xfe not utf-8 \xc3\x28")
    records = [{"id": "ok", "text": "fine"}, {"id": "number", "text": 5}, {"id": "none", "text": None},
               {"id": "missing"}, {"id": "file", "uri": str(good)}, {"id": "binary", "uri": str(bad)}]
    out = embed(records, batch_size=8, max_batch_wait_s=5.0)
    assert out["ok"].failure is None and out["file"].failure is None
    for rid in ("number", "none"):
        assert out[rid].failure.stage == "preprocess" and "'text' field must be a string" in out[rid].failure.message
    assert "neither a 'text' field nor a 'uri'" in out["missing"].failure.message
    assert out["binary"].failure.error_type == "UnicodeDecodeError"


def test_the_shipped_model_is_the_published_all_minilm_l6_v2_and_its_configuration_is_read():
    directory = model_directory(DEFAULT_EMBED_MODEL)
    digests = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in PUBLISHED_SHA256}
    assert digests == PUBLISHED_SHA256
    model = read_sentence_model(directory)
    assert (model.max_length, model.pooling, model.normalize, model.dimension) == (256, "mean", True, 384)
    assert text_embedder().output_schema.field("embedding").type.list_size == 384


def test_the_task_carries_the_models_name_and_each_worker_finds_its_own_copy():
    import pickle

    task = text_embedder()
    pickled = pickle.dumps((task.load_model, task.preprocess))
    assert b"all-MiniLM-L6-v2" in pickled and b"site-packages" not in pickled


def test_a_model_with_a_module_beyond_transformer_pooling_and_normalize_is_refused(tmp_path):
    from benchmarks.embed import export_config

    export_config(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    modules = json.loads((tmp_path / "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(
        modules + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match=r"modules \['Dense'\] are not supported"):
        text_embedder(str(tmp_path))


def test_a_model_folder_without_its_files_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json, model.safetensors missing"):
        model_directory(str(tmp_path))
    with pytest.raises(ValueError, match="unknown --model"):
        model_directory(os.path.join(str(tmp_path), "nowhere"))
