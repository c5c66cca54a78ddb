"""The job's live progress, its report, and its first error when it fails."""

import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_infer.sample import write_sample
from pipelines import run
from pipelines.console import first_error
from pipelines.progress import input_total
from tests.conftest import write_bad_files

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINE = re.compile(r"^beam_infer: ([\d,]+) / 1,500 records \([\d.]+%\), [\d,.]+ records/s, ETA (\S+), \d+ dead letters, "
                  r"bottleneck: (input|fetch|decode|h2d|forward|d2h|postprocess|unknown)$")


def test_input_total_is_counted_where_it_is_cheap(tmp_path):
    write_sample(str(tmp_path), 12)
    pq.write_table(pa.table({"uri": ["a", "b", "c"]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("uri,id\na,1\nb,2\n")
    assert input_total(None, 512) == 512  # the built-in sample
    assert input_total(str(tmp_path / "*.jpg"), 512) == 12
    assert input_total(str(tmp_path / "manifest.jsonl"), 512) == 12
    assert input_total(str(tmp_path / "m.parquet"), 512) == 3
    assert input_total(str(tmp_path / "m.csv"), 512) == 2
    assert input_total("gs://bucket/images/*.jpg", 512) is None  # a remote listing is the job's to make
    assert input_total(str(tmp_path / "missing.parquet"), 512) is None


@pytest.mark.parametrize("mode", ["in_memory", "multi_threading", "multi_processing"])
def test_progress_lines_name_done_total_rate_eta_dead_letters_and_bottleneck(tmp_path, capsys, mode):
    beam = [] if mode == "in_memory" else [f"--direct_running_mode={mode}", "--direct_num_workers=2"]
    summary = run.main(["--output", str(tmp_path / "out"), "--sample-size", "1500", "--batch-size", "16",
                        "--progress", "log", "--progress-every", "0.2", *beam])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("beam_infer: ")]
    assert summary.get("records") == 1500
    matches = [LINE.match(line) for line in lines]
    assert lines and all(matches), lines
    done = [int(m.group(1).replace(",", "")) for m in matches]
    assert done == sorted(done) and done[-1] == 1500  # the last line, at the end, by Beam's count
    assert any(0 < d < 1500 for d in done), lines  # seen while the job ran, from the workers' telemetry


def test_progress_bar_when_asked_for(tmp_path, capsys):
    run.main(["--output", str(tmp_path / "out"), "--sample-size", "200", "--progress", "bar"])
    err = capsys.readouterr().err
    assert "beam_infer: 100%" in err and "200/200" in err and "bottleneck:" in err, err[-2000:]


def test_progress_off_prints_nothing(tmp_path, capsys):
    run.main(["--output", str(tmp_path / "out"), "--sample-size", "50", "--progress", "off",
              "--progress-every", "0.05"])
    assert "beam_infer" not in capsys.readouterr().err


def test_json_report_matches_the_summary_and_covers_the_job(tmp_path, capsys):
    path = tmp_path / "report.json"
    summary = run.main(["--output", str(tmp_path / "out"), "--sample-size", "300", "--report", str(path),
                        "--progress", "off"])
    data = json.loads(path.read_text())
    assert str(path) in capsys.readouterr().out
    job = data["job"]
    assert (job["records"], job["predictions"], job["dead_letters"]) == (300, 300, 0) == (
        summary.get("records"), summary.get("predictions"), summary.get("dead_letters"))
    assert job["device"] == "cpu" and job["engines"] == 1
    tl = data["timeline"]
    assert tl["t"] and len(tl["records_per_s"]) == len(tl["t"]) == len(tl["busy"]["forward"])
    steps = [b - a for a, b in zip([0, *tl["t"]], tl["t"], strict=False)]
    assert sum(r * s for r, s in zip(tl["records_per_s"], steps, strict=True)) == pytest.approx(300, rel=0.02)
    assert sum(int(k) * n for k, n in data["batch_sizes"].items()) == 300
    assert data["bottleneck"] in ("input", "fetch", "decode", "h2d", "forward", "d2h", "postprocess")
    assert data["verdict"].startswith("The model (forward on the CPU) was busy")


def test_a_failed_job_shows_its_first_error_once_and_exits_1(tmp_path):
    """(With -v the command re-raises instead: Beam's traceback, as before.)"""
    write_bad_files(tmp_path)
    args = [sys.executable, "-m", "pipelines.run", "--input", str(tmp_path / "*.jpg"), "--output",
            str(tmp_path / "out"), "--max-dead-letters", "0"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("FailureBudgetExceeded") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("beam_infer: error: the job failed: FailureBudgetExceeded: failure budget "
                                  "exceeded"), proc.stderr
    assert "corrupt.jpg" in proc.stderr or "empty.jpg" in proc.stderr


def test_first_error_is_the_innermost_exception_of_a_workers_traceback():
    remote = RuntimeError(
        "Pipeline job-1 failed in state FAILED: java.lang.RuntimeException: Error received from SDK harness\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        "beam_infer.budget.FailureBudgetExceeded: failure budget exceeded: 3 records\n  a.jpg: preprocess\n\n"
        "During handling of the above exception, another exception occurred:\n\nTraceback (most recent call "
        "last):\n  File \"y.py\", line 2\nRuntimeError: wrapped again")
    assert first_error(remote) == ("beam_infer.budget.FailureBudgetExceeded: failure budget exceeded: 3 records\n"
                                   "  a.jpg: preprocess")
    flink = RuntimeError(
        "Pipeline BeamApp-1 failed in state FAILED: java.lang.RuntimeException: Error received from SDK harness for "
        "instruction 5: Traceback (most recent call last):\n  File \"apache_beam/runners/common.py\", line 1, in p\n"
        "pyarrow.lib.ArrowInvalid: CSV parse error: Expected 2 columns, got 3\n\tat org.apache.beam.Foo(Foo.java:1)")
    assert first_error(flink) == ("pyarrow.lib.ArrowInvalid: CSV parse error: Expected 2 columns, got 3\n"
                                  "\tat org.apache.beam.Foo(Foo.java:1)")
    assert first_error(ValueError("bad [while running 'Infer']")) == "ValueError: bad [while running 'Infer']"
    assert first_error(KeyError()) == "KeyError"
