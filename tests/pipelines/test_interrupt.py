"""Ctrl-C (SIGINT) or SIGTERM in the middle of `python -m pipelines.run`: the job stops within seconds, ends by that
signal (a shell's status 130 or 143) with one line instead of a traceback, no process of it is left, and no output
is left under a final name or in the temporary folders it had made."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from beam_infer.sample import write_sample

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORDS = 50_000  # far more than the job gets through before the signal


@pytest.fixture(scope="module")
def long_manifest(tmp_path_factory) -> str:
    """RECORDS records over the same 8 generated images: a job that runs long, made in a moment."""
    folder = tmp_path_factory.mktemp("long")
    with open(write_sample(str(folder), 8)) as f:
        uris = [json.loads(line)["uri"] for line in f]
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "uri": uris[i % len(uris)]}) + "\n" for i in range(RECORDS)))
    return str(path)


STOP_LIMIT_S = 10.0  # from the signal to the process's end, interpreter exit included, on a loaded 2-core machine


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_job_stops_it_quickly_by_that_signal_and_leaves_nothing(long_manifest, tmp_path, sig):
    output = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "pipelines.run", "--input", long_manifest, "--output", str(output),
                            "--batch-size", "16", "-v"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def read_stderr():
        for line in job.stderr:
            lines.append(line)
            if "beam_infer engine started" in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(90), "".join(lines)[-3000:]
        time.sleep(1.0)  # records in every stage
        assert job.poll() is None, "the job ended before the signal"
        assert glob.glob(str(output / "beam-temp-*")), "no write had started: nothing to clean up"
        sent = time.monotonic()
        os.killpg(job.pid, sig)  # as a terminal's Ctrl-C: to the whole process group
        job.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    reader.join(timeout=10)
    err = "".join(lines)
    assert job.returncode == -sig, err[-3000:]  # ended by the signal: a shell sees 128 + its number
    assert took < STOP_LIMIT_S, f"{took:.1f}s"
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"beam_infer: stopped by {sig.name}; removed ") and not last.startswith(
        f"beam_infer: stopped by {sig.name}; removed 0 "), err[-1000:]
    assert glob.glob(str(output / "*.parquet")) == []  # nothing under a final name
    assert glob.glob(str(output / "beam-temp-*")) == []  # nor in Beam's temporary folders
    with pytest.raises(ProcessLookupError):  # no process of the job's group is left
        os.killpg(job.pid, 0)


def test_outside_the_job_the_signal_handlers_and_beams_logging_are_as_they_were(monkeypatch):
    from beam_infer.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "_interrupted", False)  # the signal below sets it for this test only
    import logging

    from pipelines import interrupt

    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    filters = [list(h.filters) for h in logging.getLogger().handlers]
    with interrupt.stopping_on_signals() as received:
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]  # else the SIGTERM below ends pytest
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread first
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second signal of either kind ends the process
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
    assert [list(h.filters) for h in logging.getLogger().handlers] == filters
