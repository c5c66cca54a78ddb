"""ReadRecords: small records ({"uri", "id"?, …}) from a glob of files or a manifest, never the bytes; one record
per element, or lists of records (chunks) so that Beam's per-element cost is paid once per chunk."""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa

from beam_infer.io.gcs_env import storage_options

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json", ".ndjson")


def is_manifest(path: str) -> bool:
    """True when `path` names a manifest (Parquet, CSV or JSON lines) rather than the data files themselves."""
    return path.lower().endswith(MANIFEST_SUFFIXES)


def _read_table(path: str, strings: tuple[str, ...] = ()) -> pa.Table:
    """The manifest as a table; in a CSV, the `strings` columns stay strings (not numbers pyarrow guesses)."""
    with fsspec.open(path, "rb", **storage_options(path)) as f:
        lower = path.lower()
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq
            return pq.read_table(f)
        if lower.endswith(".csv"):
            import pyarrow.csv as pcsv
            return pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(strings, pa.string())))
        import pyarrow.json as pjson
        return pjson.read_json(f)


def _absolute(uri: str, base: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.join(base, uri)  # relative URIs in a manifest are relative to the manifest


def read_manifest(path: str, columns: tuple[str, ...] = ("uri",)) -> Iterator[dict[str, Any]]:
    """Yields one record per manifest row: every column, with "uri" made absolute and "id" as a string. A row with
    neither an id nor a uri (a text carried inline, say) gets `<manifest file name>:<row number>` as its id.

    Raises:
        ValueError: the manifest has none of `columns` (the fields a record names its input by).
    """
    table = _read_table(path, tuple(columns))
    if not set(columns) & set(table.column_names):
        wanted = " or ".join(repr(c) for c in columns)
        raise ValueError(f"manifest {path} has no {wanted} column (columns: {', '.join(table.column_names)})")
    base, name = posixpath.dirname(path), posixpath.basename(path)
    for number, row in enumerate(table.to_pylist()):
        if row.get("uri"):
            row["uri"] = _absolute(str(row["uri"]), base)
        if row.get("id") is not None:
            row["id"] = str(row["id"])
        elif not row.get("uri"):
            row["id"] = f"{name}:{number}"
        yield row


def match_files(pattern: str) -> Iterator[dict[str, Any]]:
    """Yields {"uri": …} for every file matching `pattern` (local or any fsspec URL), in sorted order.

    Raises:
        FileNotFoundError: nothing matches.
    """
    fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=storage_options(pattern))
    files = sorted(p for p in paths if not fs.isdir(p))
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r}")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    for path in files:
        yield {"uri": path if local else fs.unstrip_protocol(path)}


def expand_input(source: str, columns: tuple[str, ...] = ("uri",)) -> Iterator[dict[str, Any]]:
    """Records of a manifest (which has one of `columns`), or of the files a glob matches."""
    return read_manifest(source, columns) if is_manifest(source) else match_files(source)


def chunked(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of `size` records (the last one shorter), in order."""
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _chunked_input(source: str, size: int, columns: tuple[str, ...]) -> Iterator[list[dict[str, Any]]]:
    return chunked(expand_input(source, columns), size)


class ReadRecords(beam.PTransform):
    """Reads `source` (a glob such as gs://bucket/images/*.jpg, or a Parquet/CSV/JSONL manifest with a "uri"
    column and optionally "id" and other small columns) into a PCollection of record dicts, or, with
    `chunk_size`, of lists of up to `chunk_size` record dicts.

    Chunks make every transform up to RunGpuInference (which takes both forms) pay Beam's per-element cost
    (tens of microseconds on DirectRunner, and a CPU cost that holds the GIL the decode threads need) once per
    chunk instead of once per record; a chunk is also the unit Reshuffle spreads over workers.

    A manifest of texts (or other small inputs carried by the record itself) names its column in `columns`: rows
    need that column or a "uri", and rows without an "id" get one (see read_manifest).

    The listing runs on a worker; follow with beam.Reshuffle() to spread the records over workers.
    """

    def __init__(self, source: str, chunk_size: int | None = None, columns: tuple[str, ...] = ("uri",)) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        self._source = source
        self._chunk_size = chunk_size
        self._columns = tuple(columns)

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        source = pbegin | "Source" >> beam.Create([self._source])
        if self._chunk_size is None:
            return source | "List" >> beam.FlatMap(expand_input, self._columns)
        return source | "List" >> beam.FlatMap(_chunked_input, self._chunk_size, self._columns)
