"""Dataflow options for a GPU job: what `pipelines.run` adds to Beam's options for `--runner DataflowRunner`.

    python -m pipelines.run --runner DataflowRunner --gpu-type nvidia-l4 --worker-image IMAGE \
        --input gs://bucket/images/*.jpg --output gs://bucket/out --project P --region R --temp_location gs://…

becomes, for Beam (each added only where the user did not set it already):

    --dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver
    --machine_type=g2-standard-8                        # the GPU's machine series; --machine_type overrides
    --disk_size_gb=50                                   # room for a CUDA torch image; --disk_size_gb overrides
    --sdk_container_image=IMAGE                         # docker/Dockerfile: CUDA torch + beam_infer
    --experiments=use_runner_v2                         # custom containers need Runner v2
    --experiments=no_use_multiple_sdk_containers        # one SDK process per VM: one engine, one model copy

Dataflow starts one SDK process per vCPU by default, and beam_infer keeps one engine (one model copy, one CUDA
context) per process, so a g2-standard-8 would hold 8 model copies on one GPU, each filling its own batches from
an eighth of the bundles. One SDK process per VM keeps one copy whose batches fill from every bundle; the
engine's own thread pools do the fetching and decoding. `--sdk-processes per-vcpu` keeps Dataflow's default and
turns on NVIDIA MPS instead, which Dataflow supports on one-GPU workers only.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, PipelineOptions, WorkerOptions

DATAFLOW_RUNNERS = ("dataflowrunner", "dataflow")  # the names Beam's create_runner maps to DataflowRunner

# A Dataflow GPU needs a machine type of the series that carries it (Compute Engine's GPU platforms); 8 vCPUs
# give the engine's fetch and decode threads room. Keys: Dataflow's accelerator type, then the GPU count.
DEFAULT_MACHINE_TYPES: dict[str, dict[int, str]] = {
    "nvidia-l4": {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
    "nvidia-tesla-t4": {1: "n1-standard-8", 2: "n1-standard-8", 4: "n1-standard-8"},
    "nvidia-tesla-a100": {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g"},
    "nvidia-a100-80gb": {1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
}
GPU_DISK_SIZE_GB = 50  # Dataflow's default batch boot disk (25 GB with Shuffle) is tight for a CUDA torch image
ONE_SDK_PROCESS = "no_use_multiple_sdk_containers"
RUNNER_V2 = "use_runner_v2"
# Beam's Dataflow client logs "Created job with id: [ID]" at INFO; Airflow's Beam operator reads that line.
JOB_ID_LOGGER = "apache_beam.runners.dataflow.internal.apiclient"
_JOB_ID_HANDLER = "beam_infer_dataflow_job_id"


def add_dataflow_arguments(parser: argparse.ArgumentParser) -> None:
    """The job flags for Dataflow workers (used with --runner DataflowRunner only)."""
    group = parser.add_argument_group("Dataflow workers (with --runner DataflowRunner)")
    group.add_argument("--gpu-type", help="Dataflow accelerator type, e.g. nvidia-l4 or nvidia-tesla-t4")
    group.add_argument("--gpu-count", type=int, help="GPUs per worker VM (default 1)")
    group.add_argument("--worker-image", help="the SDK container image for the workers (see docker/Dockerfile)")
    group.add_argument("--sdk-processes", choices=("one", "per-vcpu"),
                       help="SDK processes per worker VM with a GPU: one (default; one engine and model copy per "
                            "VM) or per-vcpu (Dataflow's default, with NVIDIA MPS sharing the GPU)")


def dataflow_args(args: argparse.Namespace, beam_args: Sequence[str]) -> list[str]:
    """Beam's arguments with the Dataflow worker options the job flags stand for.

    Args:
        args: parsed job flags: runner, input, output and those of `add_dataflow_arguments`.
        beam_args: the arguments for Beam; what the user set there wins over the defaults added here.

    Returns:
        `beam_args` unchanged for other runners; for Dataflow, `beam_args` followed by the added options.

    Raises:
        ValueError: a Dataflow flag with another runner; input or output that Dataflow workers cannot reach;
            a GPU without a worker image; a second accelerator; two different images; MPS with several GPUs.
    """
    flags = {"--gpu-type": args.gpu_type, "--gpu-count": args.gpu_count, "--worker-image": args.worker_image,
             "--sdk-processes": args.sdk_processes}
    if args.runner.lower() not in DATAFLOW_RUNNERS:
        if given := [name for name, value in flags.items() if value is not None]:
            raise ValueError(f"{', '.join(given)}: Dataflow options, but --runner is {args.runner}")
        return list(beam_args)
    _check_paths(args.input, args.output, getattr(args, "weights", None))
    if args.gpu_type is None and (args.gpu_count is not None or args.sdk_processes is not None):
        raise ValueError("--gpu-count and --sdk-processes need --gpu-type")
    options = PipelineOptions(list(beam_args))
    image = options.view_as(WorkerOptions).sdk_container_image
    added = []
    if args.worker_image:
        if image not in (None, args.worker_image):
            raise ValueError(f"--worker-image {args.worker_image} and --sdk_container_image {image} differ")
        if image is None:
            added.append(f"--sdk_container_image={args.worker_image}")
        image = args.worker_image
    if image:
        added.append(f"--experiments={RUNNER_V2}")
    if args.gpu_type:
        if not image:
            raise ValueError("a GPU job needs workers with CUDA torch and beam_infer: pass --worker-image "
                             "(build it from docker/Dockerfile)")
        count = 1 if args.gpu_count is None else args.gpu_count
        added += _gpu_args(args.gpu_type, count, args.sdk_processes or "one", options)
    experiments = options.view_as(DebugOptions).experiments or []
    return list(beam_args) + [a for a in added if a.removeprefix("--experiments=") not in experiments]


def _check_paths(source: str | None, output: str, weights: str | None = None) -> None:
    if source is None:
        raise ValueError("--input is required on Dataflow: the built-in sample is written to a local temp "
                         "directory that the workers cannot read")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        raise ValueError("STORAGE_EMULATOR_HOST is set: gs:// would go to a local emulator the Dataflow service "
                         "and its workers cannot reach; unset it")
    for flag, path in (("--input", source), ("--output", output), ("--weights", weights)):
        if path is not None and "://" not in path:
            raise ValueError(f"{flag} {path!r} is a local path; Dataflow workers need a URL such as gs://…")


def _gpu_args(gpu_type: str, count: int, sdk_processes: str, options: PipelineOptions) -> list[str]:
    if count < 1:
        raise ValueError(f"--gpu-count {count}: must be at least 1")
    service_options = options.view_as(GoogleCloudOptions).dataflow_service_options or []
    if any(o.startswith("worker_accelerator=") for o in service_options):
        raise ValueError("--gpu-type and a worker_accelerator in --dataflow_service_options: name the GPU once")
    mps = sdk_processes == "per-vcpu"
    if mps and (count != 1 or ONE_SDK_PROCESS in (options.view_as(DebugOptions).experiments or [])):
        raise ValueError("--sdk-processes per-vcpu shares the GPU through NVIDIA MPS, which Dataflow supports on "
                         f"workers with one GPU and several SDK processes only (--gpu-count {count})")
    accelerator = f"type:{gpu_type};count:{count};install-nvidia-driver" + (";use_nvidia_mps" if mps else "")
    added = [f"--dataflow_service_options=worker_accelerator={accelerator}"]
    if not mps:
        added.append(f"--experiments={ONE_SDK_PROCESS}")
    worker = options.view_as(WorkerOptions)
    if worker.machine_type is None:
        machine_type = DEFAULT_MACHINE_TYPES.get(gpu_type, {}).get(count)
        if machine_type is None:
            raise ValueError(f"no default machine type for {count} × {gpu_type}: pass --machine_type")
        added.append(f"--machine_type={machine_type}")
    if worker.disk_size_gb is None:
        added.append(f"--disk_size_gb={GPU_DISK_SIZE_GB}")
    return added


def log_dataflow_job_id(runner: str) -> None:
    """On Dataflow, lets Beam's job-id lines reach stderr although the job logs at WARNING otherwise.

    Airflow's Beam operator (and a person at the terminal) reads "Created job with id: [ID]" from them: with the
    id it links the job, waits for it through the Dataflow API and cancels it when the Airflow task is killed.
    """
    logger = logging.getLogger(JOB_ID_LOGGER)
    if runner.lower() not in DATAFLOW_RUNNERS or any(h.get_name() == _JOB_ID_HANDLER for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.set_name(_JOB_ID_HANDLER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
