"""Checks of the job's options before anything starts: each mistake a person can make on the command line becomes one
line on stderr and exit status 2, not a Beam stack trace minutes later.

What is checked here is what the launching machine can know: local inputs, manifests, weights and outputs (remote
ones are checked by the job when it reads and writes them), the model's name, and, for the in-process
DirectRunner, the device and the dtype (on a cluster or Dataflow the workers' machines decide those).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from beam_infer.config import _DTYPES
from beam_infer.io.fetch import is_local
from beam_infer.io.read import is_manifest

LOCAL_RUNNERS = ("DirectRunner", "InProcessDirectRunner")
REMOTE_ONLY_RUNNERS = ("DataflowRunner",)  # its paths are checked by pipelines.dataflow: local ones are refused
_GLOB_CHARS = "*?["


class UsageError(Exception):
    """A mistake in the job's options, said in one line for the person who launched it."""


def check_job(args: argparse.Namespace) -> None:
    """Raises UsageError for the first mistake in `args` (pipelines.run's parsed options)."""
    check_counts(args)
    if args.runner in LOCAL_RUNNERS:
        check_device(args.device, args.dtype)
    elif args.dtype != "auto" and args.dtype not in _DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r}: auto, {', '.join(_DTYPES)}")
    if args.runner in REMOTE_ONLY_RUNNERS:
        return
    if args.input is not None:
        check_input(args.input)
    if args.weights is not None and is_local(args.weights):
        check_weights(args.weights)
    if is_local(args.output):
        check_output(args.output)


def check_counts(args: argparse.Namespace) -> None:
    for name in ("batch_size", "chunk_size", "top_k", "sample_size", "image_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_dead_letters is not None and args.max_dead_letters < 0:
        raise UsageError(f"--max-dead-letters must be 0 or more, got {args.max_dead_letters}")
    fraction = args.max_dead_letter_fraction
    if fraction is not None and not 0 <= fraction <= 1:
        raise UsageError(f"--max-dead-letter-fraction must be between 0 and 1, got {fraction}")


def check_input(source: str) -> None:
    """A local input: the glob matches a file, the file is there, a manifest has a 'uri' column."""
    if not is_local(source):
        return
    path = os.path.expanduser(source)
    if any(c in path for c in _GLOB_CHARS) and not is_manifest(path):
        if not any(os.path.isfile(p) for p in glob.iglob(path, recursive=True)):
            raise UsageError(f"--input {source!r} matches no file")
        return
    if not os.path.exists(path):
        raise UsageError(f"--input {source}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"--input {source} is a folder: give a glob of its files ({os.path.join(source, '*.jpg')}) "
                         "or a manifest")
    if is_manifest(path):
        columns = manifest_columns(path)
        if "uri" not in columns:
            raise UsageError(f"--input {source}: the manifest has no 'uri' column (columns: "
                             f"{', '.join(columns) or 'none'})")


def manifest_columns(path: str) -> list[str]:
    """The column names of a local Parquet, CSV or JSON-lines manifest, read from its head only."""
    try:
        lower = path.lower()
        if lower.endswith(".parquet"):
            return list(pq.read_schema(path).names)
        if lower.endswith(".csv"):
            with pa_csv.open_csv(path) as reader:
                return list(reader.schema.names)
        with open(path) as f:
            first = next((line for line in f if line.strip()), "")
        return list(json.loads(first)) if first else []
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"--input {path}: cannot read the manifest: {_first_line(e)}") from e


def check_weights(uri: str) -> None:
    """A local --weights file opens as a state_dict (torch.load with weights_only=True, memory-mapped: cheap)."""
    path = os.path.expanduser(uri.removeprefix("file://"))
    if not os.path.isfile(path):
        raise UsageError(f"--weights {uri}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, pickle's UnpicklingError, EOFError, zipfile's errors…
        raise UsageError(f"--weights {uri}: not a weights file torch can load: {_first_line(e)}") from e
    if not isinstance(state, dict):
        raise UsageError(f"--weights {uri}: holds a {type(state).__name__}, not a state_dict")


def check_device(device: str, dtype: str) -> None:
    """The device exists on this machine and runs `dtype` (for the in-process runner)."""
    if dtype != "auto" and dtype not in _DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}: auto, {', '.join(_DTYPES)}")
    if device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise UsageError(f"unknown --device {device!r}: auto, cpu, cuda or cuda:N") from None
        if resolved.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {device}: beam_infer runs on cpu or cuda")
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'})")
        if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype == "auto":
        return
    if resolved.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name(resolved)} does not support it; "
                         "use float16 or float32")
    if resolved.type == "cpu":
        try:  # the ops an image model needs, at this dtype, on this CPU
            x = torch.ones(1, 3, 8, 8, dtype=_DTYPES[dtype])
            torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3, dtype=x.dtype)).mean(dim=(2, 3)) @ torch.ones(
                4, 2, dtype=x.dtype)
        except RuntimeError as e:
            raise UsageError(f"--dtype {dtype} on the CPU: {_first_line(e)}") from e


def check_output(output: str) -> None:
    """The local --output folder can be made and written to."""
    path = os.path.expanduser(output)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".beam_infer_write_check_"):
            pass
    except OSError as e:
        raise UsageError(f"--output {output}: cannot write there ({e.strerror or e})") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
