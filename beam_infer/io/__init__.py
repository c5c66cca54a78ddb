"""Read and write transforms."""

from beam_infer.io.read import ReadRecords
from beam_infer.io.write import (
    DEAD_LETTERS_SCHEMA,
    WriteDeadLetters,
    WriteParquet,
    WritePredictions,
    predictions_schema,
)

__all__ = ["DEAD_LETTERS_SCHEMA", "ReadRecords", "WriteDeadLetters", "WriteParquet", "WritePredictions",
           "predictions_schema"]
