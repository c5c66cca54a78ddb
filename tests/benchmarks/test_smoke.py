"""CPU smoke runs of the benchmarks: every competitor runs and does every record. No speed is asserted."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import overhead
from benchmarks import run as bench

pytestmark = pytest.mark.timeout(600)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BEAM_INFER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _check(result, items):
    assert [c["name"] for c in result["competitors"]] == ["naive", "runinference", "spdl", "beam_infer"]
    assert [c["records"] for c in result["competitors"]] == [items] * 4
    for c in result["competitors"]:
        assert c["records_per_s"] > 0 and c["steady_records_per_s"] > 0 and c["ratio_to_bound"] > 0
        assert c["peak_rss_mb"] > 0 and c["gpu_util_pct"] is None and c["peak_gpu_mem_mb"] is None  # no GPU
    assert all(v > 0 for v in result["bounds"].values())
    assert result["bound"]["name"] in result["bounds"] or result["bound"]["name"] == "decode_and_forward"
    spdl = result["competitors"][2]  # SPDL's own stats of every stage: each ran, none failed
    stages = spdl["stages"]
    assert {"load", "collate", "h2d", "forward", "d2h", "postprocess"} <= set(stages), stages
    assert stages["load"]["tasks"] == items and stages["load"]["failures"] == 0
    assert stages["forward"]["tasks"] == spdl["batches"] > 0 and spdl["busy_s"]["forward"] > 0
    assert 0 <= stages["collate"]["queue_occupancy"] <= 1
    assert result["beam_infer_over_spdl"]["medians"] > 0


@pytest.mark.parametrize("scenario, bounds", [
    ("classify-cpu-decode", {"forward_only", "cpu_decode"}),
    ("classify-gpu-decode", {"forward_only", "device_decode"}),  # nvJPEG's stand-in on CPU: torchvision's decoder
])
def test_classify_scenarios_run_every_competitor_on_every_record(scenario, bounds):
    result = bench.main(["--scenario", scenario, "--device", "cpu", "--items", "12", "--batch-size", "4"])
    _check(result, 12)
    assert set(result["bounds"]) == bounds
    assert result["competitors"][3]["busy_s"]["forward"] > 0  # beam_infer's stage times come from its metrics


def test_img2img_from_the_command_line_writes_the_json_with_every_competitor(tmp_path):
    out = tmp_path / "img2img.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--scenario", "img2img", "--device", "cpu",
                           "--items", "10", "--batch-size", "4", "--image-size", "64", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=500, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "beam_infer" in proc.stdout and "forward_only" in proc.stdout
    result = json.loads(out.read_text())
    _check(result, 10)
    assert {"device", "date", "commit", "scenario"} <= set(result) and result["scenario"] == "img2img"


def test_repeats_run_the_competitors_in_turn_and_report_each_ones_median_run():
    result = bench.main(["--scenario", "classify-cpu-decode", "--model", "one_pixel", "--device", "cpu",
                         "--items", "8", "--batch-size", "4", "--image-size", "32", "--competitors", "spdl,beam_infer",
                         "--repeats", "3"])
    assert result["repeats"] == 3 and [c["name"] for c in result["competitors"]] == ["spdl", "beam_infer"]
    for c in result["competitors"]:
        runs = c["steady_runs"]
        assert len(runs) == 3 and c["records"] == 8 and c["steady_records_per_s"] == sorted(runs)[1]
    assert len(result["beam_infer_over_spdl"]["rounds"]) == 3


def test_overhead_measures_both_pipelines_over_the_same_records():
    result = overhead.main(["--items", "300", "--repeats", "1"])
    assert len(result["seconds"]["beam_only"]) == len(result["seconds"]["beam_infer"]) == 1
    assert result["rows_written"] == {"beam_only": [300], "beam_infer": [300]}  # every run wrote every record
    assert result["beam_us_per_record"] > 0 and isinstance(result["beam_infer_extra_us_per_record"], float)


def test_remote_fetch_reads_every_object_at_both_latencies_and_beside_spdl_and_fileio(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    result = bench.main(["--scenario", "remote-fetch", "--items", "40", "--slow-items", "6", "--latency-ms", "20"])
    rows = [(c["name"], c["latency_ms"], c["records"]) for c in result["competitors"]]
    assert rows == [("beam_infer", 0, 40), ("beam_infer", 20, 40), ("spdl", 20, 40), ("fileio", 20, 6)]
    assert all(c["steady_records_per_s"] > 0 and c["peak_rss_mb"] > 0 for c in result["competitors"])
    assert result["proxy_requests"] >= 3 * 40 + 6
    assert [t["minimum"] for t in result["targets"]] == [0.8, 10.0, 0.95]
    assert "STORAGE_EMULATOR_HOST" not in os.environ  # the benchmark's emulator does not outlive it


def test_embed_runs_every_competitor_on_a_model_directory_without_weights(tmp_path):
    """The GPU machine's way: the shipped model's directory exported without its weights gets random ones."""
    from benchmarks import embed

    embed.export_config(str(tmp_path / "minilm"))
    exported = tmp_path / "minilm"
    assert not (exported / "model.safetensors").exists() and (exported / "tokenizer.json").exists()
    result = bench.main(["--scenario", "embed", "--device", "cpu", "--items", "24", "--slow-items", "12",
                         "--batch-size", "4", "--model", str(tmp_path / "minilm")])
    assert result["weights"] == "random"
    names = [c["name"] for c in result["competitors"]]
    assert names == list(embed.COMPETITORS)
    assert [c["records"] for c in result["competitors"]] == [24, 12, 12, 12, 24, 12]
    for c in result["competitors"]:
        assert c["texts_per_s"] > 0 and c["tokens_per_s"] > 0 and c["padding_ratio"] >= 1.0
    assert {t["target"] for t in result["targets"]} == {"beam_infer padding ratio (at most)",
                                                      "beam_infer / sentence-transformers"}
