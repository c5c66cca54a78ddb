"""Read and write transforms."""

from beam_infer.io.read import ReadRecords
from beam_infer.io.write import (
    DEAD_LETTERS_SCHEMA,
    PREDICTIONS_SCHEMA,
    WriteDeadLetters,
    WriteParquet,
    WritePredictions,
)

__all__ = ["DEAD_LETTERS_SCHEMA", "PREDICTIONS_SCHEMA", "ReadRecords", "WriteDeadLetters", "WriteParquet",
           "WritePredictions"]
