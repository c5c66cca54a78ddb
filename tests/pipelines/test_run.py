import glob
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from beam_infer.io.read import read_manifest
from beam_infer.models.filters import UnsharpMask
from beam_infer.runners import InProcessDirectRunner, resolve_runner
from beam_infer.sample import write_sample
from beam_infer.tasks.img2img import UInt8ImageToImage, read_image
from pipelines import run
from tests.conftest import engine_threads, write_bad_files

pytestmark = pytest.mark.timeout(300)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_rows(output, name):
    return pq.read_table(glob.glob(os.path.join(output, f"{name}-*-of-*.parquet"))).to_pylist()


def test_python_m_pipelines_run_writes_predictions_for_the_builtin_sample(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--output", str(out), "--sample-size", "40"],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine started" not in proc.stderr and " INFO " not in proc.stderr  # quiet by default
    assert "40 records (40 predictions, 0 dead letters)" in proc.stdout
    assert "top-1 accuracy" in proc.stdout and "engines (model copies) built: 1" in proc.stdout
    batches, mean = re.search(r"batches: (\d+) \(mean size ([\d.]+)\)", proc.stdout).groups()
    assert int(batches) >= 1 and abs(int(batches) * float(mean) - 40) < 0.1 * int(batches)
    rows = read_rows(str(out), "predictions")
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    assert all(r["model"] == "shapes_net" and len(r["top_labels"]) == 3 for r in rows)
    assert sum(r["top_labels"][0] == r["label"] for r in rows) >= 38
    assert read_rows(str(out), "dead_letters") == []


def test_verbose_shows_beam_infers_info_and_keeps_beams_own_at_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--output", str(tmp_path / "out"),
                           "--sample-size", "8", "-v"], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = [line for line in proc.stderr.splitlines() if " INFO " in line]
    assert any("beam_infer.engine.engine: beam_infer engine started" in line for line in info), proc.stderr[-3000:]
    assert not [line for line in info if " apache_beam" in line], info


def test_glob_input_with_bad_files_gives_dead_letters_and_predictions_for_the_rest(sample_dir, tmp_path):
    corrupt, empty = write_bad_files(sample_dir)
    out = str(tmp_path / "out")
    summary = run.main(["--input", str(sample_dir / "*.jpg"), "--output", out, "--batch-size", "16"])
    assert (summary.get("records"), summary.get("predictions"), summary.get("dead_letters")) == (50, 48, 2)
    dead = {d["uri"]: d for d in read_rows(out, "dead_letters")}
    assert set(dead) == {corrupt, empty}
    assert dead[empty]["stage"] == "preprocess" and "0 bytes" in dead[empty]["message"]
    rows = read_rows(out, "predictions")
    assert len(rows) == 48 and all(r["id"] == r["uri"] for r in rows)  # no id column: the id is the URI
    assert engine_threads() == []


def test_manifest_input_keeps_ids_and_scores_accuracy(sample_dir, tmp_path):
    summary = run.main(["--input", str(sample_dir / "manifest.jsonl"), "--output", str(tmp_path / "o")])
    assert summary.get("labelled") == 48 and summary.get("top1_correct") >= 46
    assert {r["id"] for r in read_rows(str(tmp_path / "o"), "predictions")} == {f"shape-{i:05d}" for i in range(48)}


def test_default_runner_never_tries_prism(monkeypatch, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability import prism_runner

    def no_network(*args, **kwargs):
        raise AssertionError("the default path started the Prism runner (a network download)")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_network)
    assert isinstance(resolve_runner(PipelineOptions([])), InProcessDirectRunner)
    assert isinstance(resolve_runner(PipelineOptions(["--runner=DirectRunner"])), InProcessDirectRunner)
    assert resolve_runner(PipelineOptions(["--runner=FlinkRunner"])) is None
    summary = run.main(["--output", str(tmp_path / "o"), "--sample-size", "8"])
    assert summary.get("predictions") == 8


def test_unknown_options_pass_through_to_beam(tmp_path):
    summary = run.main(["--output", str(tmp_path / "o"), "--sample-size", "16",
                        "--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    assert summary.get("predictions") == 16


def test_decode_on_device_bisects_a_corrupt_jpeg_out_of_its_batch_and_predicts_the_rest(sample_dir, tmp_path):
    corrupt, empty = write_bad_files(sample_dir)
    out = str(tmp_path / "out")
    summary = run.main(["--input", str(sample_dir / "*.jpg"), "--output", out, "--batch-size", "16",
                        "--decode", "device", "--device", "cpu"])
    assert (summary.get("records"), summary.get("predictions"), summary.get("dead_letters")) == (50, 48, 2)
    dead = {d["uri"]: d for d in read_rows(out, "dead_letters")}
    assert dead[corrupt]["stage"] == "device_preprocess" and "truncated" in dead[corrupt]["message"]
    assert dead[empty]["stage"] == "preprocess"
    rows = read_rows(out, "predictions")
    truth = {r["uri"]: r["label"] for r in read_manifest(str(sample_dir / "manifest.jsonl"))}
    assert sum(r["top_labels"][0] == truth[r["uri"]] for r in rows) >= 46


def test_past_the_failure_budget_the_job_fails_naming_the_budget_and_the_first_errors(sample_dir, tmp_path):
    corrupt, empty = write_bad_files(sample_dir)
    with pytest.raises(Exception, match="failure budget exceeded: at least 2 records failed") as failed:
        run.main(["--input", str(sample_dir / "*.jpg"), "--output", str(tmp_path / "o"), "--max-dead-letters", "1"])
    assert "the budget allows at most 1 dead letters" in str(failed.value)
    assert f"{corrupt} ({corrupt}): preprocess: OSError" in str(failed.value)
    assert f"{empty} ({empty}): preprocess: ValueError: empty image file (0 bytes)" in str(failed.value)


def test_past_a_fractional_budget_the_job_fails_once_every_record_is_counted(sample_dir, tmp_path):
    corrupt, _ = write_bad_files(sample_dir)
    with pytest.raises(Exception, match="failure budget exceeded: 2 of 50 records failed") as failed:
        run.main(["--input", str(sample_dir / "*.jpg"), "--output", str(tmp_path / "o"),
                  "--max-dead-letter-fraction", "0.02"])
    assert "at most 2.00% of the records" in str(failed.value) and f"{corrupt} ({corrupt})" in str(failed.value)


def test_within_the_failure_budget_the_job_completes_with_its_dead_letters(sample_dir, tmp_path):
    write_bad_files(sample_dir)
    summary = run.main(["--input", str(sample_dir / "*.jpg"), "--output", str(tmp_path / "o"),
                        "--max-dead-letters", "2", "--max-dead-letter-fraction", "0.05"])
    assert summary.get("dead_letters") == 2 and summary.get("predictions") == 48


def _decoded_png(uri):
    return np.asarray(Image.open(uri).convert("RGB"))


def _filtered(model, image):
    """`image` (HWC uint8) through the job's uint8 adapter around `model`, called directly."""
    with torch.inference_mode():
        return UInt8ImageToImage(model)(torch.from_numpy(np.array(image))[None])[0].numpy()


def test_img2img_on_the_builtin_sample_writes_a_png_per_record_and_an_index_of_them(tmp_path, capsys):
    out = str(tmp_path / "out")
    summary = run.main(["--task", "img2img", "--output", out, "--sample-size", "16"])
    assert (summary.get("records"), summary.get("predictions"), summary.get("dead_letters")) == (16, 16, 0)
    printed = capsys.readouterr().out
    assert "beam_infer img2img on DirectRunner: 16 records" in printed and "model unsharp" in printed
    assert f"outputs: {out}/images/*.png, {out}/index-*.parquet, {out}/dead_letters-*.parquet" in printed
    rows = read_rows(out, "index")
    assert sorted(r["id"] for r in rows) == [f"shape-{i:05d}" for i in range(16)]
    assert all(r["model"] == "unsharp" and (r["width"], r["height"]) == (128, 128) for r in rows)
    assert sorted(os.listdir(os.path.join(out, "images"))) == sorted(f"{r['id']}.png" for r in rows)
    assert all(r["output_uri"] == os.path.join(out, "images", f"{r['id']}.png") for r in rows)
    assert read_rows(out, "dead_letters") == [] and glob.glob(os.path.join(out, "predictions-*")) == []
    # The same sample again (it is a function of its seed), through the model called directly.
    write_sample(str(tmp_path / "again"), 16)
    for r in rows:
        with open(tmp_path / "again" / f"{r['id']}.jpg", "rb") as f:
            image = read_image(f.read(), 128)
        written = _decoded_png(r["output_uri"])
        assert written.shape == (128, 128, 3)
        assert np.abs(written.astype(int) - _filtered(UnsharpMask(), image)).max() <= 1  # batch vs one: rounding
        assert np.abs(written.astype(int) - image).mean() > 1  # it sharpened


def test_img2img_with_bad_files_gives_dead_letters_and_an_image_for_every_other_record(sample_dir, tmp_path):
    corrupt, empty = write_bad_files(sample_dir)
    out = str(tmp_path / "out")
    summary = run.main(["--task", "img2img", "--input", str(sample_dir / "*.jpg"), "--output", out,
                        "--image-size", "32", "--batch-size", "16", "--model", "blur"])
    assert (summary.get("records"), summary.get("predictions"), summary.get("dead_letters")) == (50, 48, 2)
    dead = {d["uri"]: d for d in read_rows(out, "dead_letters")}
    assert set(dead) == {corrupt, empty} and {d["stage"] for d in dead.values()} == {"preprocess"}
    rows = read_rows(out, "index")
    inputs = glob.glob(str(sample_dir / "*.jpg"))
    assert sorted([r["uri"] for r in rows] + list(dead)) == sorted(inputs)  # each input exactly once
    assert sorted(os.listdir(os.path.join(out, "images"))) == sorted(os.path.basename(r["output_uri"]) for r in rows)
    for r in rows[:5]:
        assert os.path.dirname(r["output_uri"]) == os.path.join(out, "images")
        assert (r["width"], r["height"]) == (32, 32) and _decoded_png(r["output_uri"]).shape == (32, 32, 3)
    assert engine_threads() == []


def test_img2img_keeps_beam_options_passing_through(tmp_path):
    out = str(tmp_path / "o")
    summary = run.main(["--task", "img2img", "--output", out, "--sample-size", "8", "--image-size", "32",
                        "--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    assert summary.get("predictions") == 8 and len(os.listdir(os.path.join(out, "images"))) == 8


def test_each_task_gets_its_own_defaults_and_refuses_the_other_tasks_options(capsys):
    args, _ = run.parse_args([])
    assert (args.task, args.model, args.top_k, args.decode, args.image_size) == ("classify", "shapes_net", 3, "cpu",
                                                                                 None)
    args, _ = run.parse_args(["--task", "img2img"])
    assert (args.model, args.top_k, args.decode, args.image_size) == ("unsharp", None, None, 128)
    for argv, message in ((["--task", "img2img", "--decode", "device"], "--decode is an option of --task classify"),
                          (["--task", "img2img", "--top-k", "5"], "--top-k is an option of --task classify"),
                          (["--image-size", "64"], "--image-size is an option of --task img2img")):
        with pytest.raises(SystemExit):
            run.parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_home_relative_output_is_expanded_for_the_rows_and_the_images_alike(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args, _ = run.parse_args(["--task", "img2img", "--output=~/out"])
    assert args.output == str(tmp_path / "out") and run.images_dir(args.output) == str(tmp_path / "out" / "images")
