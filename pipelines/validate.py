"""Checks of the job's options before anything starts: each mistake a person can make on the command line becomes one
line on stderr and exit status 2, not a Beam stack trace minutes later.

What is checked here is what the launching machine can know: local inputs, manifests, weights and outputs (remote
ones are checked by the job when it reads and writes them; on Dataflow, pipelines.dataflow refuses local ones), and,
for the in-process DirectRunner, the device and the dtype (on a cluster or Dataflow the workers' machines decide
those). Nothing is created or changed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import zipfile

import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch

from beam_infer.config import _DTYPES
from beam_infer.io.fetch import is_local
from beam_infer.io.read import is_manifest, match_files
from beam_infer.runners import _DIRECT_NAMES
from pipelines.dataflow import DATAFLOW_RUNNERS  # its paths are checked there: local ones are refused

_GLOB_CHARS = "*?["
REPORT_SUFFIXES = (".html", ".json")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class UsageError(Exception):
    """A mistake in the job's options, said in one line for the person who launched it."""


def check_job(args: argparse.Namespace) -> None:
    """Raises UsageError for the first mistake in `args` (pipelines.run's parsed options)."""
    check_counts(args)
    if args.dtype != "auto" and args.dtype not in _DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r}: auto, {', '.join(_DTYPES)}")
    if args.runner in _DIRECT_NAMES:
        check_device(args.device, args.dtype)
    if getattr(args, "report", None):
        check_report(args.report)
    if args.runner.lower() in DATAFLOW_RUNNERS:
        return
    if args.input is not None:
        check_input(args.input, ("uri", args.text_field) if getattr(args, "text_field", None) else ("uri",))
    if args.weights is not None and is_local(args.weights):
        check_weights(args.weights)
    if is_local(args.output):
        check_output(args.output)


def check_counts(args: argparse.Namespace) -> None:
    for name in ("batch_size", "chunk_size", "top_k", "sample_size", "image_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "max_tokens", None) is not None and args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be 0 (no budget) or more, got {args.max_tokens}")
    if getattr(args, "progress_every", 1) <= 0:
        raise UsageError(f"--progress-every must be positive, got {args.progress_every}")
    if args.max_dead_letters is not None and args.max_dead_letters < 0:
        raise UsageError(f"--max-dead-letters must be 0 or more, got {args.max_dead_letters}")
    fraction = args.max_dead_letter_fraction
    if fraction is not None and not 0 <= fraction <= 1:
        raise UsageError(f"--max-dead-letter-fraction must be between 0 and 1, got {fraction}")


def is_user_factory(spec: str) -> bool:
    """Whether --model `spec` names the user's own `module:function` (not a shipped name or torchvision:<name>)."""
    module, _, name = spec.partition(":")
    return bool(name) and module != "torchvision"


def check_model_name(spec: str) -> None:
    """A `module:function` --model names a module that imports and a function in it (torchvision:<name> and the
    shipped names are the resolvers' to check). An error raised inside the user's module is theirs: it keeps its
    traceback."""
    if not is_user_factory(spec):
        return
    module, _, name = spec.partition(":")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:  # a parent package that is not there; an empty name
        raise UsageError(f"--model {spec}: {e}") from e
    if found is None:
        raise UsageError(f"--model {spec}: No module named {module!r}")
    if not hasattr(importlib.import_module(module), name):
        raise UsageError(f"--model {spec}: {module} has no function {name}")


def check_input(source: str, columns: tuple[str, ...] = ("uri",)) -> None:
    """A local input: the glob matches a file, the file is there, a manifest has one of `columns` (a 'uri', or
    the embed job's text)."""
    if not is_local(source):
        return
    path = os.path.expanduser(source)
    if any(c in path for c in _GLOB_CHARS) and not is_manifest(path):
        try:
            next(iter(match_files(path)))  # the job's own matching (fsspec's glob)
        except (FileNotFoundError, StopIteration):
            raise UsageError(f"--input {source!r} matches no file") from None
        return
    if not os.path.exists(path):
        raise UsageError(f"--input {source}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"--input {source} is a folder: give a glob of its files ({os.path.join(source, '*.jpg')}) "
                         "or a manifest")
    if is_manifest(path):
        found = manifest_columns(path)
        if not set(columns) & set(found):
            wanted = " or ".join(repr(c) for c in columns)
            raise UsageError(f"--input {source}: the manifest has no {wanted} column (columns: "
                             f"{', '.join(found) or 'none'})")


def manifest_columns(path: str) -> list[str]:
    """The column names of a local Parquet, CSV or JSON-lines manifest as the job's reader (pyarrow) sees them,
    read from the file's head where pyarrow can stream it."""
    try:
        lower = path.lower()
        if lower.endswith(".parquet"):
            return list(pq.read_schema(path).names)
        if lower.endswith(".csv"):
            with pa_csv.open_csv(path) as reader:
                return list(reader.schema.names)
        if hasattr(pa_json, "open_json"):  # pyarrow 19 and later
            with pa_json.open_json(path) as reader:
                return list(reader.schema.names)
        return list(pa_json.read_json(path).column_names)
    except Exception as e:  # pyarrow's ArrowInvalid (a ValueError), OSError, whatever a broken file raises
        raise UsageError(f"--input {path}: cannot read the manifest: {_first_line(e)}") from e


def check_weights(uri: str) -> None:
    """A local --weights file opens as a state_dict (torch.load with weights_only=True, as the workers load it;
    memory-mapped where torch can, so a large file costs little)."""
    path = os.path.expanduser(uri)
    if not os.path.isfile(path):
        raise UsageError(f"--weights {uri}: no such file")
    try:  # mmap needs torch's zip format; a legacy-format file loads whole, as on the workers
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises RuntimeError, pickle's UnpicklingError, EOFError, zipfile's errors…
        raise UsageError(f"--weights {uri}: not a weights file torch can load: {_first_line(e)}") from e
    if not isinstance(state, dict):
        raise UsageError(f"--weights {uri}: holds a {type(state).__name__}, not a state_dict")


def check_device(device: str, dtype: str) -> None:
    """The device exists on this machine and runs `dtype` (for the in-process runner). Other device names are
    EngineConfig's to refuse."""
    if device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise UsageError(f"unknown --device {device!r}: auto, cpu, cuda or cuda:N") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'})")
        if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name(resolved)} does not support it; "
                         "use float16 or float32")
    # On the CPU torch runs all three dtypes (float16 and bfloat16 slowly): nothing to refuse.


def check_output(output: str) -> None:
    """The local --output folder exists and is writable, or its nearest existing parent is a writable folder
    (nothing is made here: the job makes the folder)."""
    path = os.path.abspath(os.path.expanduser(output))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output {output}: cannot write there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: cannot write there ({existing} is not writable)")


def check_report(path: str) -> None:
    """--report names a local .html or .json file in an existing, writable folder (the launcher writes it)."""
    if not path.lower().endswith(REPORT_SUFFIXES):
        raise UsageError(f"--report {path}: name a {' or '.join(REPORT_SUFFIXES)} file")
    if not is_local(path):
        raise UsageError(f"--report {path}: the report is written on this machine: name a local file")
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--report {path}: cannot write there ({folder} is not a writable folder)")


def _first_line(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip().splitlines()  # torch bolds parts of its messages for a terminal
    return text[0] if text else type(error).__name__
