"""The Airflow virtualenv the example-DAG tests run in: built once from examples/airflow's pinned files, cached.

It lives in ~/.cache/beam_infer/airflow-venv-<key>, the key a hash of requirements.txt, constraints.txt and the
interpreter, so a changed pin builds a new one. A build that fails raises with pip's output: the tests that need
Airflow fail rather than skip (a missing network is a failure too, unless the venv is already cached).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

AIRFLOW_DIR = Path(__file__).resolve().parents[2] / "examples" / "airflow"
PINNED_FILES = ("requirements.txt", "constraints.txt")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "beam_infer"
_COMPLETE = "beam_infer-venv-complete"  # written last: a venv without it is a broken build and is rebuilt
_PIP_TIMEOUT_S = 840  # the whole cold install; a test that builds the venv has a 900 s timeout


def venv_key() -> str:
    digest = hashlib.sha256(f"{os.path.realpath(sys.executable)} {sys.version}".encode())
    for name in PINNED_FILES:
        digest.update((AIRFLOW_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def airflow_python() -> Path:
    """The interpreter of the cached Airflow virtualenv, building the venv first if it is not there.

    Raises:
        RuntimeError: the venv could not be built (pip's output is in the message).
    """
    venv = CACHE / f"airflow-venv-{venv_key()}"
    python = venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "airflow-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second process then finds it complete
        if not (venv / _COMPLETE).exists():
            _build(venv)
    return python


def _build(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "-r", str(AIRFLOW_DIR / "requirements.txt"), "-c", str(AIRFLOW_DIR / "constraints.txt")],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"could not build the Airflow venv in {venv} (needs PyPI, or a cached venv):\n"
                               f"$ {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    (venv / _COMPLETE).write_text(" ".join(PINNED_FILES) + "\n")
