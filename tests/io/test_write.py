import glob

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from beam_infer import InProcessDirectRunner, WriteDeadLetters, WritePredictions
from beam_infer.io.write import DEAD_LETTERS_SCHEMA, predictions_schema
from beam_infer.tasks.classify import CLASSIFICATION_SCHEMA

pytestmark = pytest.mark.timeout(60)


def test_predictions_are_written_with_the_explicit_schema_and_extra_fields_dropped(tmp_path):
    rows = [{"id": "a", "uri": "/a.jpg", "model": "m", "top_labels": ["x", "y"], "top_scores": [0.9, 0.1],
             "value": 3.0},  # extra field, not in the schema
            {"id": "b", "uri": "/b.jpg", "model": "m", "label": "x", "top_labels": ["x"], "top_scores": [1.0]}]
    with TestPipeline(runner=InProcessDirectRunner()) as p:
        p | beam.Create(rows) | WritePredictions(str(tmp_path), CLASSIFICATION_SCHEMA)
    files = glob.glob(str(tmp_path / "predictions-*-of-*.parquet"))
    assert files
    table = pq.read_table(files)
    assert table.schema == predictions_schema(CLASSIFICATION_SCHEMA)
    assert table.schema.names == ["id", "uri", "model", "label", "top_labels", "top_scores"]
    assert sorted(table.to_pylist(), key=lambda r: r["id"])[0] == {
        "id": "a", "uri": "/a.jpg", "model": "m", "label": None, "top_labels": ["x", "y"],
        "top_scores": [pytest.approx(0.9), pytest.approx(0.1)]}


def test_no_dead_letters_still_writes_an_empty_file_with_the_schema(tmp_path):
    with TestPipeline(runner=InProcessDirectRunner()) as p:
        p | beam.Create([]) | WriteDeadLetters(str(tmp_path))
    (path,) = glob.glob(str(tmp_path / "dead_letters-*.parquet"))
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.schema == DEAD_LETTERS_SCHEMA


def test_a_schema_with_a_required_column_still_drops_extra_fields_and_nulls_missing_optional_ones(tmp_path):
    import pyarrow as pa

    from beam_infer.io.write import WriteParquet

    schema = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("n", pa.int64())])
    rows = [{"id": "a", "n": 1, "extra": "dropped"}, {"id": "b"}]
    with TestPipeline(runner=InProcessDirectRunner()) as p:
        p | beam.Create(rows) | WriteParquet(str(tmp_path), "things", schema)
    table = pq.read_table(glob.glob(str(tmp_path / "things-*.parquet")))
    assert table.schema.names == ["id", "n"]
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == [{"id": "a", "n": 1}, {"id": "b", "n": None}]


def _write(directory, ids, shards):
    with TestPipeline(runner=InProcessDirectRunner()) as p:
        rows = p | beam.Create([{"id": i, "uri": f"/{i}.jpg", "model": "m"} for i in ids])
        rows | WritePredictions(str(directory), CLASSIFICATION_SCHEMA, num_shards=shards)


def test_a_rerun_with_fewer_shards_leaves_only_its_own_shards_and_other_files_alone(tmp_path):
    (tmp_path / "predictions-notes.txt").write_text("not a shard")
    (tmp_path / "dead_letters-00000-of-00001.parquet").write_bytes(b"another writer's")
    _write(tmp_path, ["a", "b", "c", "d"], shards=3)
    assert len(glob.glob(str(tmp_path / "predictions-*.parquet"))) == 3
    _write(tmp_path, ["x", "y"], shards=2)
    files = sorted(glob.glob(str(tmp_path / "predictions-*.parquet")))
    assert [f.rsplit("/", 1)[1] for f in files] == ["predictions-00000-of-00002.parquet",
                                                    "predictions-00001-of-00002.parquet"]
    assert sorted(pq.read_table(files)["id"].to_pylist()) == ["x", "y"]
    assert (tmp_path / "predictions-notes.txt").exists() and (tmp_path / "dead_letters-00000-of-00001.parquet").exists()


def test_removing_other_shards_does_nothing_when_nothing_was_written(tmp_path):
    from beam_infer.io.write import remove_other_shards

    old = tmp_path / "predictions-00000-of-00001.parquet"
    old.write_bytes(b"x")
    assert remove_other_shards([], str(tmp_path / "predictions")) == [] and old.exists()


def test_a_retried_finalize_that_renamed_only_some_shards_keeps_all_of_this_runs_shards(tmp_path):
    from beam_infer.io.write import remove_other_shards

    ours = [tmp_path / f"predictions-0000{i}-of-00003.parquet" for i in range(3)]
    older = tmp_path / "predictions-00000-of-00005.parquet"
    for path in [*ours, older]:
        path.write_bytes(b"x")
    removed = remove_other_shards([str(ours[1]), str(ours[2])], str(tmp_path / "predictions"))  # 0 renamed earlier
    assert removed == [str(older)] and all(path.exists() for path in ours) and not older.exists()
