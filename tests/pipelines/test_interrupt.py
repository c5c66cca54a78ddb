"""Ctrl-C (SIGINT) or SIGTERM in the middle of `python -m pipelines.run`: the job stops within 5 s with exit status
130 or 143 and one line instead of a traceback, no process of it is left, and no output is left under a final name
or in Beam's temporary folders."""

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


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_job_stops_it_quickly_with_its_status_and_leaves_nothing(long_manifest, tmp_path, sig, status):
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
        sent = time.monotonic()
        job.send_signal(sig)
        job.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    reader.join(timeout=10)
    err = "".join(lines)
    assert job.returncode == status, err[-3000:]
    assert took < 5.0, f"{took:.1f}s"
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"beam_infer: stopped by {sig.name}; removed "), err[-1000:]
    assert glob.glob(str(output / "*.parquet")) == []  # nothing under a final name
    assert glob.glob(str(output / "beam-temp-*")) == []  # nor in Beam's temporary folders
    with pytest.raises(ProcessLookupError):  # no process of the job's group is left
        os.killpg(job.pid, 0)


def test_outside_the_job_the_signal_handlers_and_beams_logging_are_as_they_were():
    import logging

    from pipelines import interrupt

    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    filters = [list(h.filters) for h in logging.getLogger().handlers]
    with interrupt.stopping_on_signals() as received:
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread first
        assert received == [signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
    assert [list(h.filters) for h in logging.getLogger().handlers] == filters
