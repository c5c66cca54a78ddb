"""beam_infer.report: the data and the self-contained page."""

import json
import re

import pytest

from beam_infer import report
from tests.test_monitor import engine_log

pytestmark = pytest.mark.timeout(30)
JOB = {"task": "classify", "runner": "DirectRunner", "started": "2026-12-01 00:00:00 UTC", "records": 1000,
       "device": "auto", "dtype": "auto"}


def test_report_data_has_the_timeline_the_verdict_and_the_engines_device():
    log = engine_log(10, 100, {"preprocess": 3.8, "forward": 0.3}, in_flight=250)
    data = report.build(JOB, [log], 1000.0, 1010.0)
    assert data["job"]["device"] == "cpu" and data["bottleneck"] == "decode"
    assert "waiting on decode" in data["verdict"]
    tl = data["timeline"]
    assert len(tl["t"]) == 10 and sum(tl["records_per_s"]) == pytest.approx(1000)
    assert tl["busy"]["decode"][3] == pytest.approx(3.8 / 4)
    json.dumps(data)  # JSON as it stands


def test_html_is_one_file_that_fetches_nothing(tmp_path):
    log = engine_log(30, 100, {"preprocess": 1.0, "forward": 0.9}, in_flight=250, device="cuda:0",
                     gpu_util=80, gpu_mem=3 * 2**30)
    path = tmp_path / "r.html"
    report.write(str(path), report.build(JOB, [log], 1000.0, 1030.0))
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=|url\(|@import|<link|https?://(?!www\.w3\.org)""", page)
    assert page.count("<svg") >= 5 and "<polyline" in page and "GPU" in page
    assert "The GPU was busy 80%" in page


def test_report_without_telemetry_says_so(tmp_path):
    path = tmp_path / "r.json"
    report.write(str(path), report.build(JOB, [], 1000.0, 1010.0))
    data = json.loads(path.read_text())
    assert data["timeline"]["t"] == [] and "No engine telemetry" in data["verdict"]
    assert "No engine telemetry" in report.render_html(data)
