import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_infer import InProcessDirectRunner, ReadRecords
from beam_infer.io.read import expand_input, match_files, read_manifest

pytestmark = pytest.mark.timeout(60)
ROWS = [{"id": 1, "uri": "a.jpg", "label": "circle"}, {"id": 2, "uri": "/abs/b.jpg", "label": "star"}]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifest_rows_become_records_with_absolute_uris_and_string_ids(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pcsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert list(read_manifest(str(path))) == [
        {"id": "1", "uri": f"{tmp_path}/a.jpg", "label": "circle"},
        {"id": "2", "uri": "/abs/b.jpg", "label": "star"},
    ]


def test_manifest_without_uri_column_is_a_clear_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"path": "a.jpg"}\n')
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(read_manifest(str(path)))


def test_a_manifest_of_texts_keeps_a_numeric_looking_csv_text_column_as_strings_and_numbers_its_rows(tmp_path):
    path = tmp_path / "texts.csv"
    path.write_text("body,topic\n12345,1\nhello,2\n")
    assert list(read_manifest(str(path), ("uri", "body"))) == [
        {"body": "12345", "topic": 1, "id": "texts.csv:0"}, {"body": "hello", "topic": 2, "id": "texts.csv:1"}]
    with pytest.raises(ValueError, match="no 'uri' or 'text' column"):
        list(read_manifest(str(path), ("uri", "text")))


def test_glob_lists_matching_files_sorted(tmp_path):
    for name in ["b.jpg", "a.jpg", "c.png"]:
        (tmp_path / name).write_bytes(b"x")
    assert [r["uri"] for r in match_files(str(tmp_path / "*.jpg"))] == [f"{tmp_path}/a.jpg", f"{tmp_path}/b.jpg"]


def test_glob_on_an_fsspec_url_keeps_the_protocol():
    import fsspec
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://read_test/x/1.jpg", b"1")
    fs.pipe("memory://read_test/x/2.jpg", b"2")
    from beam_infer.io.fetch import fetch_bytes
    uris = [r["uri"] for r in expand_input("memory://read_test/x/*.jpg")]
    assert all(u.startswith("memory://") for u in uris)
    assert [fetch_bytes(u) for u in uris] == [b"1", b"2"]


def test_a_glob_that_matches_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(match_files(str(tmp_path / "*.jpg")))


def test_read_records_transform_yields_the_manifest_records(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with TestPipeline(runner=InProcessDirectRunner()) as p:
        ids = p | ReadRecords(str(path)) | beam.Map(lambda r: (r["id"], r["uri"]))
        assert_that(ids, equal_to([("1", f"{tmp_path}/a.jpg"), ("2", "/abs/b.jpg")]))


@pytest.mark.parametrize("chunk_size, sizes", [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (5, [5]), (64, [5])])
def test_read_records_in_chunks_yields_every_record_once_in_lists_of_at_most_chunk_size(tmp_path, chunk_size, sizes):
    rows = [{"id": str(i), "uri": f"/data/{i}.jpg"} for i in range(5)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with TestPipeline(runner=InProcessDirectRunner()) as p:
        chunks = p | ReadRecords(str(path), chunk_size=chunk_size)
        assert_that(chunks | beam.Map(len), equal_to(sizes), label="Sizes")
        assert_that(chunks | beam.FlatMap(lambda c: [r["id"] for r in c]), equal_to([str(i) for i in range(5)]))


def test_a_chunk_size_below_one_is_refused():
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        ReadRecords("m.jsonl", chunk_size=0)
