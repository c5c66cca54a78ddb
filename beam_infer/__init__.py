"""beam_infer: offline batch inference with PyTorch as an Apache Beam job that keeps the GPU busy."""

from beam_infer.budget import Budget, FailureBudget, FailureBudgetExceeded
from beam_infer.config import EngineConfig
from beam_infer.dofn import DEAD_LETTERS, PREDICTIONS, RunGpuInference
from beam_infer.engine.errors import EngineError, EngineFatalError
from beam_infer.io import ReadRecords, WriteDeadLetters, WriteParquet, WritePredictions
from beam_infer.models import resolve_task
from beam_infer.runners import EmbeddedLoopbackPortableRunner, InProcessDirectRunner
from beam_infer.task import InferenceTask
from beam_infer.tasks.classify import image_classifier, shapes_classifier

__all__ = [
    "Budget", "FailureBudget", "FailureBudgetExceeded",
    "DEAD_LETTERS", "PREDICTIONS", "EmbeddedLoopbackPortableRunner", "EngineConfig", "EngineError",
    "EngineFatalError", "InProcessDirectRunner",
    "InferenceTask", "ReadRecords", "RunGpuInference", "WriteDeadLetters", "WriteParquet", "WritePredictions",
    "image_classifier", "resolve_task", "shapes_classifier",
]
