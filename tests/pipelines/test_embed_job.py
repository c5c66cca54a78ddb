"""python -m pipelines.run --task embed: the built-in corpus, a manifest of texts, and its mistakes."""

import glob
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import run
from pipelines.validate import UsageError

pytestmark = pytest.mark.timeout(300)


def rows(directory, prefix):
    files = glob.glob(f"{directory}/{prefix}-*.parquet")
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_embed_job_on_the_builtin_corpus_writes_one_normalised_embedding_per_text(tmp_path):
    out = str(tmp_path / "o")
    summary = run.main(["--task", "embed", "--output", out, "--sample-size", "48", "--progress", "off"])
    table = rows(out, "embeddings")
    assert summary.get("predictions") == table.num_rows == 48 and summary.get("dead_letters") == 0
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert table.column("id").to_pylist() and len(set(table.column("id").to_pylist())) == 48
    assert all(t >= 2 for t in table.column("tokens").to_pylist())  # [CLS] and [SEP] at least
    norms = [sum(v * v for v in e) for e in table.column("embedding").to_pylist()]
    assert all(abs(n - 1) < 1e-3 for n in norms)


def test_a_manifest_of_texts_keeps_its_ids_and_a_bad_text_is_a_dead_letter_naming_the_field(tmp_path):
    manifest = tmp_path / "texts.jsonl"
    lines = [{"doc": "first text"}, {"doc": "second, longer text " * 30}, {"doc": None}, {"doc": "x " * 5000}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    out = str(tmp_path / "o")
    run.main(["--task", "embed", "--input", str(manifest), "--text-field", "doc", "--output", out,
              "--progress", "off"])
    good = {r["id"]: r for r in rows(out, "embeddings").to_pylist()}
    assert sorted(good) == ["texts.jsonl:0", "texts.jsonl:1", "texts.jsonl:3"]  # row numbers as ids
    assert good["texts.jsonl:3"]["truncated"] and good["texts.jsonl:3"]["tokens"] == 256
    assert not good["texts.jsonl:0"]["truncated"]
    (dead,) = rows(out, "dead_letters").to_pylist()
    assert dead["id"] == "texts.jsonl:2" and dead["stage"] == "preprocess" and "'doc' field" in dead["message"]


def test_a_manifest_without_the_text_column_and_options_of_another_task_are_usage_errors(tmp_path):
    manifest = tmp_path / "texts.csv"
    manifest.write_text("id,body\n1,hello\n")
    with pytest.raises(UsageError, match="no 'uri' or 'text' column"):
        run.checked_job(["--task", "embed", "--input", str(manifest)])
    with pytest.raises(SystemExit):
        run.checked_job(["--task", "embed", "--top-k", "3"])
    with pytest.raises(UsageError, match="max-tokens"):
        run.checked_job(["--task", "embed", "--max-tokens", "-1"])
    with pytest.raises(UsageError, match="unknown --model"):
        run.checked_job(["--task", "embed", "--model", str(tmp_path)])
