"""The HTML report of a real job, opened in headless Chromium: no console message, the charts drawn, a screenshot
that is not blank and shows them. `.ci/run` installs Debian's chromium where it is missing and sets
BEAM_INFER_REQUIRE_BROWSER=1, so in CI this test fails, never skips, without a browser."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from beam_infer.report import COLORS
from pipelines import run
from tests.browser import find_chromium, load

pytestmark = pytest.mark.timeout(180)
REQUIRE_BROWSER = "BEAM_INFER_REQUIRE_BROWSER"
NO_NETWORK = "--host-resolver-rules=MAP * ~NOTFOUND"  # the page must need nothing from outside


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"no chromium on PATH ({REQUIRE_BROWSER}=1: the browser test must run)", pytrace=False)
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return path


def test_console_messages_of_a_broken_page_are_caught(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.log('hello'); undefinedFunction();</script></body></html>")
    _, console = load(chromium, str(page))
    assert any("hello" in m for m in console) and any("undefinedFunction" in m for m in console), console


def test_report_of_the_builtin_sample_renders_its_charts_in_chromium(chromium, tmp_path):
    report = tmp_path / "report.html"
    run.main(["--output", str(tmp_path / "out"), "--sample-size", "1500", "--report", str(report),
              "--progress", "off"])
    png = tmp_path / "report.png"
    dom, console = load(chromium, str(report), NO_NETWORK, f"--screenshot={png}", "--window-size=900,2300")
    assert console == []
    charts = re.findall(r"<svg class=\"chart\".*?</svg>", dom, flags=re.S)
    assert len(charts) >= 5, dom[:2000]
    lines = re.findall(r'<polyline[^>]* points="([^"]+)"', dom)
    assert lines and max(len(points.split()) for points in lines) >= 2  # a line, not a dot
    assert "1,500" in dom and "id=\"verdict\"" in dom

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # not blank
    blue = np.array([int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5)])
    green = np.array([int(COLORS[2][i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - blue).sum(axis=1) < 30).sum() > 500  # the lines and the busiest stage's strip
    assert (np.abs(pixels - green).sum(axis=1) < 30).sum() > 500  # the batch-size bars
