"""The Dataflow options pipelines.run assembles, checked offline: no job is submitted and Google is never called."""

import logging
import re
import tempfile

import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.dataflow.internal import apiclient

from beam_infer.runners import resolve_runner
from pipelines import run
from pipelines.dataflow import JOB_ID_LOGGER

pytestmark = pytest.mark.timeout(60)
IMAGE = "us-docker.pkg.dev/p/beam/beam-infer:1"
JOB = ["--runner", "DataflowRunner", "--input", "gs://b/images/*.jpg", "--output", "gs://b/out",
       "--project", "p", "--region", "us-central1", "--temp_location", "gs://b/tmp"]
L4 = [*JOB, "--gpu-type", "nvidia-l4", "--worker-image", IMAGE]


@pytest.fixture(autouse=True)
def job_id_logger():
    """Beam's Dataflow client logger, as main() leaves it; its handlers and level are restored afterwards."""
    logger = logging.getLogger(JOB_ID_LOGGER)
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def assembled(monkeypatch, argv) -> PipelineOptions:
    """The options main() hands to run_job for `argv` (run_job is replaced: nothing runs)."""
    seen = []

    def fake_run_job(options, *rest, **named):
        seen.append(options)
        return run.Summary({}, 1.0)

    monkeypatch.setattr(run, "run_job", fake_run_job)
    monkeypatch.chdir(tempfile.mkdtemp(prefix="beam_infer_dataflow_test_"))  # a local --output stays out of the repo
    run.main(argv)
    (options,) = seen
    return options


def dataflow_environment(options: PipelineOptions):
    """The Environment of the Dataflow job request Beam would send for these options, built offline."""
    return apiclient.Environment(packages=[], options=options, environment_version="8",
                                 proto_pipeline_staged_url="gs://b/staging/pipeline.pb").proto


def test_l4_job_gets_the_accelerator_machine_image_and_one_sdk_process(monkeypatch):
    options = assembled(monkeypatch, L4)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert resolve_runner(options) is None  # Beam's own DataflowRunner
    cloud, worker, debug = (options.view_as(v) for v in (GoogleCloudOptions, WorkerOptions, DebugOptions))
    assert cloud.dataflow_service_options == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert (cloud.project, cloud.region, cloud.temp_location) == ("p", "us-central1", "gs://b/tmp")
    assert (worker.machine_type, worker.disk_size_gb, worker.sdk_container_image) == ("g2-standard-8", 50, IMAGE)
    assert sorted(debug.experiments) == ["no_use_multiple_sdk_containers", "use_runner_v2"]


def test_the_dataflow_job_request_carries_the_gpu_and_a_single_sdk_container(monkeypatch):
    env = dataflow_environment(assembled(monkeypatch, L4))
    assert list(env.service_options) == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    (pool,) = env.worker_pools
    assert (pool.machine_type, pool.disk_size_gb, pool.worker_harness_container_image) == \
        ("g2-standard-8", 50, IMAGE)
    assert "no_use_multiple_sdk_containers" in env.experiments
    assert "use_multiple_sdk_containers" not in env.experiments  # Beam adds it unless told otherwise


def test_without_the_gpu_flags_beam_keeps_one_sdk_container_per_vcpu(monkeypatch):
    env = dataflow_environment(assembled(monkeypatch, [*JOB, "--worker-image", IMAGE]))
    assert list(env.service_options) == []
    assert "use_multiple_sdk_containers" in env.experiments
    assert env.worker_pools[0].worker_harness_container_image == IMAGE


def test_user_machine_type_disk_and_experiments_win_and_are_not_repeated(monkeypatch):
    options = assembled(monkeypatch, [*L4, "--machine_type", "g2-standard-16", "--disk_size_gb", "100",
                                      "--experiments=use_runner_v2", "--experiments=enable_data_sampling"])
    worker = options.view_as(WorkerOptions)
    assert (worker.machine_type, worker.disk_size_gb) == ("g2-standard-16", 100)
    assert sorted(options.view_as(DebugOptions).experiments) == \
        ["enable_data_sampling", "no_use_multiple_sdk_containers", "use_runner_v2"]


def test_two_t4s_get_an_n1_machine_and_the_count(monkeypatch):
    options = assembled(monkeypatch, [*JOB, "--gpu-type", "nvidia-tesla-t4", "--gpu-count", "2",
                                      "--worker-image", IMAGE])
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == \
        ["worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"]
    assert options.view_as(WorkerOptions).machine_type == "n1-standard-8"


def test_sdk_processes_per_vcpu_keeps_dataflows_default_and_shares_the_gpu_through_mps(monkeypatch):
    options = assembled(monkeypatch, [*L4, "--sdk-processes", "per-vcpu"])
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == \
        ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver;use_nvidia_mps"]
    assert options.view_as(DebugOptions).experiments == ["use_runner_v2"]


def test_sdk_container_image_given_to_beam_directly_serves_the_gpu_job(monkeypatch):
    options = assembled(monkeypatch, [*JOB, "--gpu-type", "nvidia-l4", "--sdk_container_image", IMAGE])
    assert options.view_as(WorkerOptions).sdk_container_image == IMAGE
    assert options.view_as(WorkerOptions).machine_type == "g2-standard-8"


@pytest.mark.parametrize("argv, message", [
    ([*JOB, "--gpu-type", "nvidia-l4"], "needs workers with CUDA torch"),
    ([*L4, "--sdk-processes", "per-vcpu", "--gpu-count", "2"], "one GPU"),
    ([*L4, "--sdk-processes", "per-vcpu", "--experiments=no_use_multiple_sdk_containers"], "one GPU"),
    ([*L4, "--gpu-count", "0"], "at least 1"),
    ([*JOB, "--gpu-type", "nvidia-h100-80gb", "--worker-image", IMAGE], "pass --machine_type"),
    ([*L4, "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1"], "name the GPU once"),
    ([*L4, "--sdk_container_image", "other:1"], "differ"),
    ([*JOB, "--gpu-count", "2", "--worker-image", IMAGE], "need --gpu-type"),
    ([*JOB[:2], "--output", "gs://b/out", "--gpu-type", "nvidia-l4"], "--input is required on Dataflow"),
    ([*JOB, "--output", "local_dir"], "is a local path"),
    ([*JOB, "--weights", "model.pt"], "--weights 'model.pt' is a local path"),
    (["--gpu-type", "nvidia-l4", "--worker-image", IMAGE], "--gpu-type, --worker-image: Dataflow options"),
])
def test_inconsistent_dataflow_flags_fail_before_anything_runs(monkeypatch, capsys, argv, message):
    refused(monkeypatch, capsys, argv, message)


def refused(monkeypatch, capsys, argv, message):
    """main(argv) exits with status 2 and `message` in its one line on stderr, before anything runs."""
    with pytest.raises(SystemExit) as exit_:
        assembled(monkeypatch, argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("beam_infer: error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_dataflow_job_refuses_a_storage_emulator_its_workers_cannot_reach(monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    refused(monkeypatch, capsys, JOB, "STORAGE_EMULATOR_HOST is set")


def test_an_unknown_gpu_runs_with_an_explicit_machine_type(monkeypatch):
    options = assembled(monkeypatch, [*JOB, "--gpu-type", "nvidia-h100-80gb", "--worker-image", IMAGE,
                                      "--machine_type", "a3-highgpu-1g"])
    assert options.view_as(WorkerOptions).machine_type == "a3-highgpu-1g"
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == \
        ["worker_accelerator=type:nvidia-h100-80gb;count:1;install-nvidia-driver"]


def test_on_dataflow_beams_job_id_line_reaches_stderr_once_for_airflow_to_read(monkeypatch, job_id_logger, capfd):
    assembled(monkeypatch, ["--output", "o", "--sample-size", "1"])  # DirectRunner: nothing changes
    job_id_logger.info("Created job with id: [%s]", "direct")
    assembled(monkeypatch, L4)
    assembled(monkeypatch, L4)
    job_id_logger.info("Created job with id: [%s]", "2026-11-27_01_02_03-42")
    err = capfd.readouterr().err
    assert "direct" not in err
    assert err.count("Created job with id: [2026-11-27_01_02_03-42]") == 1
