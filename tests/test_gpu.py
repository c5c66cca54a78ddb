"""GPU-only behaviour: run on a machine with CUDA (`python -m pytest -m gpu`)."""

import numpy as np
import pytest
import torch

from beam_infer import EngineConfig, shapes_classifier
from beam_infer.engine import Engine
from beam_infer.io.read import read_manifest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _predict(engine, records):
    bundle = engine.open_bundle()
    for r in records:
        bundle.submit(r)
    return {r.record["id"]: r for r in bundle.drain()}


def test_cuda_bf16_results_match_cpu_results_within_bf16_tolerance(sample_dir):
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    cpu = Engine(shapes_classifier(), EngineConfig(device="cpu", batch_size=16)).retain()
    gpu = Engine(shapes_classifier(), EngineConfig(device="cuda", dtype="bfloat16", batch_size=16)).retain()
    a, b = _predict(cpu, records), _predict(gpu, records)
    cpu.release()
    gpu.release()
    assert set(a) == set(b) and all(r.failure is None for r in b.values())
    agree = sum(a[k].value["top_labels"][0] == b[k].value["top_labels"][0] for k in a)
    assert agree >= len(a) - 1
    for k in a:
        np.testing.assert_allclose(a[k].value["top_scores"][0], b[k].value["top_scores"][0], atol=0.03)


class _Heavy(torch.nn.Module):
    """A forward long enough (a chain of matmuls) that the next batch's copy must overlap it to be hidden."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(1024, 1024) / 32)

    def forward(self, x):
        h = x.reshape(len(x), -1)[:, :1024].float()
        for _ in range(40):
            h = torch.tanh(h @ self.w)
        return h[:, :4]


def test_h2d_of_the_next_batch_overlaps_the_forward_of_the_previous():
    from beam_infer.task import InferenceTask

    task = InferenceTask("heavy", _Heavy, lambda data, r: np.frombuffer(data, np.uint8).reshape(512, 1024),
                         lambda outs, r: {"n": float(outs[0][0])})
    import fsspec
    fs = fsspec.filesystem("memory")
    payload = np.random.default_rng(0).integers(0, 255, size=512 * 1024, dtype=np.uint8).tobytes()
    records = []
    for i in range(8 * 64):
        fs.pipe(f"memory://gpu_overlap/{i}.bin", payload)
        records.append({"id": str(i), "uri": f"memory://gpu_overlap/{i}.bin"})
    engine = Engine(task, EngineConfig(device="cuda", dtype="float32", batch_size=64, trace_events=True,
                                       max_batch_wait_s=1.0)).retain()
    results = _predict(engine, records)
    engine.release()
    assert all(r.failure is None for r in results.values())
    torch.cuda.synchronize()
    base = engine.trace[0][2]
    spans = {(n, stage): (base.elapsed_time(s), base.elapsed_time(e)) for n, stage, s, e in engine.trace}
    overlapped = [k for k in range(7) if (k + 1, "h2d") in spans and (k, "forward") in spans
                  and spans[(k + 1, "h2d")][0] < spans[(k, "forward")][1]
                  and spans[(k + 1, "h2d")][1] > spans[(k, "forward")][0]]
    assert overlapped, f"no H2D overlapped a forward: {sorted(spans.items())}"


def test_nvjpeg_decode_on_cuda_classifies_like_pil_decode_on_cpu(sample_dir):
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    cpu = Engine(shapes_classifier(), EngineConfig(device="cpu", batch_size=16)).retain()
    gpu = Engine(shapes_classifier(decode="device"), EngineConfig(device="cuda", batch_size=16)).retain()
    a, b = _predict(cpu, records), _predict(gpu, records)
    cpu.release()
    gpu.release()
    assert all(r.failure is None for r in b.values()), [r.failure for r in b.values() if r.failure]
    agree = sum(a[k].value["top_labels"][0] == b[k].value["top_labels"][0] for k in a)
    assert agree >= len(a) - 2


def test_an_output_row_kept_by_postprocess_is_not_overwritten_when_its_pinned_buffer_is_reused():
    from beam_infer.task import InferenceTask
    from tests.fakes import Doubler, read_number, safe, write_numbers

    task = InferenceTask("keeps_rows", Doubler, read_number, lambda outs, r: {"row": outs[0]})
    engine = Engine(task, EngineConfig(device="cuda", dtype="float32", batch_size=4, host_buffers=1)).retain()
    records = write_numbers(safe(40))
    results = _predict(engine, records)
    engine.release()
    assert sorted(float(r.value["row"][0]) for r in results.values()) == [2 * v for v in safe(40)]


class _Narrow(torch.nn.Module):
    """Returns one column of its (large) input: the forward needs almost no memory beyond the input itself."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, :1].float()


def test_a_real_out_of_memory_in_h2d_halves_the_batch_and_every_record_succeeds():
    from beam_infer.task import InferenceTask
    from tests.fakes import safe, write_numbers

    row = 4 << 20  # 4 MiB per record: a batch of 64 is 256 MiB on the device
    task = InferenceTask("narrow", _Narrow, lambda data, r: np.full(row, int(r["value"]) % 251, np.uint8),
                         lambda outs, r: {"first": float(outs[0][0])})
    engine = Engine(task, EngineConfig(device="cuda", dtype="float32", batch_size=64, max_batch_wait_s=1.0)).retain()
    records = write_numbers(safe(256))
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(free - (200 << 20), dtype=torch.uint8, device="cuda")  # leaves 200 MiB: not a whole batch
    try:
        results = _predict(engine, records)
    finally:
        del filler
        torch.cuda.empty_cache()
        engine.release()
    assert all(r.failure is None for r in results.values()), [r.failure for r in results.values() if r.failure][:3]
    assert sorted(r.value["first"] for r in results.values()) == sorted(float(int(v) % 251) for v in safe(256))
    assert engine.row_limits.get("h2d") is not None and engine.row_limits.get("h2d") < 64


def test_a_device_side_assert_ends_the_worker_process_with_a_clear_error():
    import os
    import pathlib
    import subprocess
    import sys

    from beam_infer.engine.errors import FATAL_EXIT_CODE

    root = pathlib.Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-m", "tests.engine.fatal_worker", "cuda"], capture_output=True,
                          text=True, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == FATAL_EXIT_CODE, done.stdout + done.stderr[-3000:]
    assert "bundle failed: " in done.stdout and "device fault in" in done.stdout, done.stdout
    assert "still alive" not in done.stdout


def test_nvjpeg_batch_with_a_corrupt_jpeg_dead_letters_it_and_predicts_the_rest_like_the_cpu(sample_dir):
    # Last in this file: should nvJPEG break the CUDA context, the tests before have already run.
    from tests.conftest import write_bad_files

    cut_short, _ = write_bad_files(sample_dir)
    no_image = str(sample_dir / "no_image.jpg")  # a JPEG signature and nothing else: fails at nvJPEG's header step
    with open(no_image, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + bytes(64))
    records = list(read_manifest(str(sample_dir / "manifest.jsonl")))
    cpu = Engine(shapes_classifier(), EngineConfig(device="cpu", batch_size=64)).retain()
    gpu = Engine(shapes_classifier(decode="device"), EngineConfig(device="cuda", batch_size=64)).retain()
    a = _predict(cpu, records)
    bad = [{"id": "no_image", "uri": no_image}, {"id": "cut_short", "uri": cut_short}]
    b = _predict(gpu, records + bad)  # one batch: bisected on the GPU
    cpu.release()
    gpu.release()
    assert b["no_image"].failure is not None and b["no_image"].failure.stage == "device_preprocess"
    # Hardware nvJPEG may decode a file cut short into a partly grey image instead of failing: either is fine.
    assert b["cut_short"].failure is None or b["cut_short"].failure.stage == "device_preprocess"
    assert all(b[k].failure is None for k in a), [(k, b[k].failure) for k in a if b[k].failure]
    agree = sum(a[k].value["top_labels"][0] == b[k].value["top_labels"][0] for k in a)
    assert agree >= len(a) - 2
