"""Parquet writers with explicit pyarrow schemas: sharded, atomic (Beam's file sink), any Beam filesystem."""

from __future__ import annotations

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


class WriteParquet(beam.PTransform):
    """Writes dict rows as `<directory>/<name>-SSSSS-of-NNNNN.parquet`, keeping only the schema's columns.

    Files appear atomically (written to a temporary folder, then renamed), so a reader never sees half a file.
    """

    def __init__(self, directory: str, name: str, schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__()
        self._prefix = directory.rstrip("/") + "/" + name
        self._schema = schema
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> beam.pvalue.PDone:
        if not all(field.nullable for field in self._schema):  # Beam's writer reads a missing nullable column
            rows = rows | "Project" >> beam.Map(_project, tuple(self._schema.names))  # as null, and no other
        return rows | "Write" >> beam.io.WriteToParquet(self._prefix, self._schema, file_name_suffix=".parquet",
                                                        num_shards=self._num_shards)


def predictions_schema(output_schema: pa.Schema) -> pa.Schema:
    """A prediction row's schema: id, uri and model, then the task's own columns."""
    return pa.schema([*RECORD_FIELDS, *output_schema])


class WritePredictions(WriteParquet):
    """Predictions as `<directory>/predictions-*.parquet`: id, uri, model and the task's `output_schema`."""

    def __init__(self, directory: str, output_schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__(directory, "predictions", predictions_schema(output_schema), num_shards)


class WriteDeadLetters(WriteParquet):
    """Dead letters as `<directory>/dead_letters-*.parquet` (id, uri, stage, error_type, message)."""

    def __init__(self, directory: str, num_shards: int = 0) -> None:
        super().__init__(directory, "dead_letters", DEAD_LETTERS_SCHEMA, num_shards)
