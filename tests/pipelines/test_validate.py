"""Mistakes on the command line stop `python -m pipelines.run` before anything starts: one line on stderr, exit
status 2, no traceback. One case per mistake, through main() (the same path as the command), and one through a
real `python -m pipelines.run` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import run, validate

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def refused(capsys, argv: list[str]) -> str:
    """The one line main(argv) printed on stderr before it exited with status 2."""
    with pytest.raises(SystemExit) as exit_:
        run.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("beam_infer: error: "), err
    return err.removeprefix("beam_infer: error: ")


@pytest.fixture
def out(tmp_path) -> str:
    return str(tmp_path / "out")


def test_a_missing_input_file(capsys, tmp_path, out):
    assert refused(capsys, ["--input", str(tmp_path / "nope.parquet"), "--output", out]) == (
        f"--input {tmp_path / 'nope.parquet'}: no such file")


def test_a_glob_matching_nothing(capsys, tmp_path, out):
    assert refused(capsys, ["--input", str(tmp_path / "*.jpg"), "--output", out]) == (
        f"--input '{tmp_path / '*.jpg'}' matches no file")


def test_a_folder_instead_of_a_glob(capsys, tmp_path, out):
    assert "is a folder: give a glob of its files" in refused(capsys, ["--input", str(tmp_path), "--output", out])


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_a_manifest_without_a_uri_column(capsys, tmp_path, out, suffix):
    path = tmp_path / f"m.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.table({"path": ["a.jpg"], "label": ["x"]}), path)
    elif suffix == "csv":
        path.write_text("path,label\na.jpg,x\n")
    else:
        path.write_text(json.dumps({"path": "a.jpg", "label": "x"}) + "\n")
    assert refused(capsys, ["--input", str(path), "--output", out]) == (
        f"--input {path}: the manifest has no 'uri' column (columns: path, label)")


def test_a_json_lines_manifest_is_read_as_the_job_reads_it(tmp_path):
    path = tmp_path / "m.jsonl"  # a BOM, and the uri column only from the second row on
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a"}\n{"id": "b", "uri": "b.jpg"}\n')
    validate.check_input(str(path))


def test_a_json_array_manifest_is_one_line_not_a_crash(capsys, tmp_path, out):
    path = tmp_path / "m.json"
    path.write_text('[{"uri": "a.jpg"}]')
    assert refused(capsys, ["--input", str(path), "--output", out]).startswith(
        f"--input {path}: cannot read the manifest: ")


def test_a_glob_matches_as_the_job_matches_hidden_files_too(tmp_path):
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    validate.check_input(str(tmp_path / "*.jpg"))


def test_an_unreadable_manifest(capsys, tmp_path, out):
    path = tmp_path / "m.parquet"
    path.write_bytes(b"not parquet at all")
    assert refused(capsys, ["--input", str(path), "--output", out]).startswith(
        f"--input {path}: cannot read the manifest: ")


def test_an_unknown_model(capsys, out):
    assert refused(capsys, ["--model", "resnet", "--output", out]) == (
        "unknown --model 'resnet': use shapes_net, torchvision:<name> or <module>:<function>")
    assert not os.path.exists(out)  # a refused job makes nothing


def test_a_model_module_without_the_function(capsys, out):
    assert refused(capsys, ["--model", "json:no_such_function", "--output", out]) == (
        "--model json:no_such_function: json has no function no_such_function")


def test_an_error_inside_the_users_model_function_keeps_its_traceback(tmp_path, monkeypatch, out):
    (tmp_path / "my_models.py").write_text("def broken():\n    raise ValueError('a bug in my factory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="a bug in my factory"):
        run.main(["--model", "my_models:broken", "--output", out])


def test_a_model_module_that_is_not_there(capsys, out):
    assert refused(capsys, ["--model", "no_such_module:make", "--output", out]) == (
        "--model no_such_module:make: No module named 'no_such_module'")


def test_a_missing_weights_file(capsys, tmp_path, out):
    assert refused(capsys, ["--weights", str(tmp_path / "w.pt"), "--output", out]) == (
        f"--weights {tmp_path / 'w.pt'}: no such file")


def test_a_weights_file_torch_cannot_load(capsys, tmp_path, out):
    path = tmp_path / "w.pt"
    path.write_bytes(b"\x80\x04garbage")
    assert refused(capsys, ["--weights", str(path), "--output", out]).startswith(
        f"--weights {path}: not a weights file torch can load: ")


def test_a_legacy_format_state_dict_is_accepted(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)  # loads whole: no mmap
    validate.check_weights(str(path))


def test_a_weights_file_that_is_not_a_state_dict(capsys, tmp_path, out):
    path = tmp_path / "w.pt"
    torch.save([torch.zeros(2)], path)
    assert refused(capsys, ["--weights", str(path), "--output", out]) == (
        f"--weights {path}: holds a list, not a state_dict")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--chunk-size", "-3", "--chunk-size must be at least 1, got -3"),
    ("--top-k", "0", "--top-k must be at least 1, got 0"),
    ("--sample-size", "0", "--sample-size must be at least 1, got 0"),
    ("--max-dead-letter-fraction", "1.5", "--max-dead-letter-fraction must be between 0 and 1, got 1.5"),
])
def test_counts_out_of_range(capsys, out, flag, value, message):
    assert refused(capsys, [flag, value, "--output", out]) == message


def test_an_image_size_out_of_range(capsys, out):
    assert refused(capsys, ["--task", "img2img", "--image-size", "0", "--output", out]) == (
        "--image-size must be at least 1, got 0")


@pytest.mark.parametrize("runner", ["DataflowRunner", "dataflow"])
def test_a_dataflow_job_leaves_its_paths_to_the_dataflow_checks(tmp_path, monkeypatch, runner):
    monkeypatch.chdir(tmp_path)
    args, _ = run.parse_args(["--runner", runner, "--output", "local_dir", "--weights", "w.pt"])
    validate.check_job(args)  # pipelines.dataflow refuses local paths on Dataflow, with its own message
    assert not (tmp_path / "local_dir").exists()  # nothing made on the launching machine


def test_an_unknown_device(capsys, out):
    assert refused(capsys, ["--device", "gpu", "--output", out]) == "unknown --device 'gpu': auto, cpu, cuda or cuda:N"


def test_a_device_the_engine_refuses_on_any_runner(capsys, out):
    assert refused(capsys, ["--device", "cpu:0", "--runner", "FlinkRunner", "--output", out]) == (
        "EngineConfig.device must be auto, cpu, cuda or cuda:N, got 'cpu:0'")


def test_argparses_own_errors_are_one_line_too(capsys):
    assert refused(capsys, ["--task", "classfy"]).startswith("argument --task: invalid choice: 'classfy'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the case is a machine without it")
def test_cuda_asked_where_there_is_none(capsys, out):
    assert refused(capsys, ["--device", "cuda", "--output", out]).startswith(
        "--device cuda: this machine has no CUDA device")


def test_an_unknown_dtype(capsys, out):
    assert refused(capsys, ["--dtype", "float8", "--output", out]) == (
        "unknown --dtype 'float8': auto, float32, bfloat16, float16")


def test_an_output_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert refused(capsys, ["--output", str(blocker / "out")]) == (
        f"--output {blocker / 'out'}: cannot write there ({blocker} is not a folder)")


def test_the_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--input", str(tmp_path / "*.jpg"),
                           "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"beam_infer: error: --input '{tmp_path / '*.jpg'}' matches no file"


def test_help_groups_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    positions = [text.index(f"\n{group}:") for group in ("input", "model", "engine", "output", "failure budget",
                                                        "runner")]
    assert positions == sorted(positions)


def test_a_report_that_is_neither_html_nor_json(capsys, tmp_path, out):
    assert refused(capsys, ["--output", out, "--report", str(tmp_path / "r.txt")]) == (
        f"--report {tmp_path / 'r.txt'}: name a .html or .json file")


def test_a_report_in_a_missing_folder(capsys, tmp_path, out):
    assert refused(capsys, ["--output", out, "--report", str(tmp_path / "no" / "r.html")]) == (
        f"--report {tmp_path / 'no' / 'r.html'}: cannot write there ({tmp_path / 'no'} is not a writable folder)")


def test_a_remote_report(capsys, out):
    assert "the report is written on this machine" in refused(capsys, ["--output", out, "--report", "gs://b/r.html"])


def test_a_progress_interval_that_is_not_positive(capsys, out):
    assert refused(capsys, ["--output", out, "--progress-every", "0"]) == "--progress-every must be positive, got 0.0"


def test_an_unknown_torchvision_model(capsys, out):
    assert refused(capsys, ["--output", out, "--model", "torchvision:resnet9000"]).startswith(
        "unknown --model 'torchvision:resnet9000': torchvision ")


def test_bfloat16_on_a_gpu_without_it(capsys, out, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    assert refused(capsys, ["--device", "cuda", "--dtype", "bfloat16", "--output", out]) == (
        "--dtype bfloat16: Tesla T4 does not support it; use float16 or float32")


def test_an_output_folder_without_write_permission(capsys, tmp_path, monkeypatch):
    # As root every folder is writable: os.access says what it would say to another user.
    monkeypatch.setattr(validate.os, "access", lambda path, mode: False)
    assert refused(capsys, ["--output", str(tmp_path / "out")]) == (
        f"--output {tmp_path / 'out'}: cannot write there ({tmp_path} is not writable)")
