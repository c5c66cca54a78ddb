"""What the engine hands back for each record: a Result, with a value or a Failure naming the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from beam_infer.task import Record


@dataclass(frozen=True)
class Failure:
    """Why a record produced no value: the stage it failed in, the error's type and message."""

    stage: str
    error_type: str
    message: str

    @classmethod
    def of(cls, stage: str, error: BaseException) -> Failure:
        return cls(stage, type(error).__name__, str(error) or repr(error))


@dataclass
class Result:
    """A finished record: its input, the context it was submitted with, and a value or a failure."""

    record: Record
    context: Any
    value: dict[str, Any] | None = None
    failure: Failure | None = None
