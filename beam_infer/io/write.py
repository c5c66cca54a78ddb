"""Parquet writers with explicit pyarrow schemas: sharded, atomic (Beam's file sink), any Beam filesystem."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import apache_beam as beam
import pyarrow as pa

RECORD_FIELDS = pa.schema([("id", pa.string()), ("uri", pa.string()), ("model", pa.string())])

DEAD_LETTERS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
])


def _project(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: row.get(name) for name in names}


_SHARD = re.compile(r"-\d{5}-of-(\d{5})\.parquet")


def _shard_count(path: str, prefix: str) -> str | None:
    """NNNNN of `<prefix>-SSSSS-of-NNNNN.parquet`; None for any other name."""
    shard = _SHARD.fullmatch(os.path.basename(path)[len(os.path.basename(prefix)):])
    return shard.group(1) if shard else None
_LOG = logging.getLogger(__name__)


def remove_other_shards(written: list[str], prefix: str) -> list[str]:
    """Deletes the files named like shards of `prefix` (`<prefix>-SSSSS-of-NNNNN.parquet`) that are not in
    `written`: an earlier run's, left behind when it had another shard count. Returns what it deleted.

    Nothing is deleted when nothing was written.
    """
    from apache_beam.io.filesystems import FileSystems

    if not written:
        return []
    # By shard count, not by name: a retried finalize returns only the files it renamed itself, and Beam has
    # already replaced every earlier file of this run's count.
    counts = {_shard_count(path, prefix) for path in written}
    matched = FileSystems.match([f"{prefix}-*-of-*.parquet"])[0].metadata_list
    stale = sorted(m.path for m in matched if _shard_count(m.path, prefix) not in counts | {None})
    if stale:
        FileSystems.delete(stale)
        _LOG.warning("beam_infer: removed %d shard(s) of an earlier run from %s: %s", len(stale), prefix,
                     ", ".join(stale[:5]))
    return stale


class WriteParquet(beam.PTransform):
    """Writes dict rows as `<directory>/<name>-SSSSS-of-NNNNN.parquet`, keeping only the schema's columns.

    Files appear atomically (written to a temporary folder, then renamed), so a reader never sees half a file.
    Once they have, the shards of an earlier run into the same place that this run did not overwrite (it had
    another shard count) are deleted, so `<name>-*.parquet` reads this run's rows alone.
    """

    def __init__(self, directory: str, name: str, schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__()
        self._prefix = directory.rstrip("/") + "/" + name
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        if not all(field.nullable for field in self._schema):  # Beam's writer reads a missing nullable column
            rows = rows | "Project" >> beam.Map(_project, tuple(self._schema.names))  # as null, and no other
        written = rows | "Write" >> beam.io.WriteToParquet(self._prefix, self._schema, file_name_suffix=".parquet",
                                                           num_shards=self._num_shards)
        return (written
                | "AllWritten" >> beam.combiners.ToList()
                | "RemoveOtherShards" >> beam.Map(remove_other_shards, self._prefix))


def predictions_schema(output_schema: pa.Schema) -> pa.Schema:
    """A prediction row's schema: id, uri and model, then the task's own columns."""
    return pa.schema([*RECORD_FIELDS, *output_schema])


class WritePredictions(WriteParquet):
    """Predictions as `<directory>/<name>-*.parquet` (name: "predictions" unless told): id, uri, model and the
    task's `output_schema`."""

    def __init__(self, directory: str, output_schema: pa.Schema, num_shards: int = 0,
                 name: str = "predictions") -> None:
        super().__init__(directory, name, predictions_schema(output_schema), num_shards)


class WriteDeadLetters(WriteParquet):
    """Dead letters as `<directory>/dead_letters-*.parquet` (id, uri, stage, error_type, message)."""

    def __init__(self, directory: str, num_shards: int = 0) -> None:
        super().__init__(directory, "dead_letters", DEAD_LETTERS_SCHEMA, num_shards)
