"""The overlapped inference engine: stages, host buffers, CUDA streams. See README.md here."""

from beam_infer.engine.engine import Bundle, Engine, configure_process, load_on_device
from beam_infer.engine.errors import EngineError, EngineFatalError
from beam_infer.engine.results import Failure, Result
from beam_infer.engine.tensors import as_numpy

__all__ = ["Bundle", "Engine", "EngineError", "EngineFatalError", "Failure", "Result", "as_numpy", "configure_process",
           "load_on_device"]
