"""examples/airflow: real Airflow loads the DAG, and its Beam operator builds (and runs) `python -m pipelines.run`.

Airflow runs in a cached virtualenv of its own (airflow_venv.py); the first run builds it (minutes), so every test
here has a timeout that covers that. The provider's command for Dataflow is recorded, not run (Google is not
reachable here), and then parsed by pipelines.run's own argument handling; the DirectRunner command runs.
"""

import glob
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, PipelineOptions, WorkerOptions

from pipelines import run
from pipelines.dataflow import dataflow_args
from tests.examples.airflow_venv import AIRFLOW_DIR, airflow_python

pytestmark = pytest.mark.timeout(900)
REPO = AIRFLOW_DIR.parents[1]
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "airflow_probe.py")
IMAGE = "us-docker.pkg.dev/p/beam/beam-infer:1"
DATAFLOW_ENV = {"GCP_PROJECT": "p", "GCP_REGION": "europe-west4", "BEAM_INFER_INPUT": "gs://b/images/*.jpg",
                "BEAM_INFER_OUTPUT": "gs://b/out", "BEAM_INFER_IMAGE": IMAGE, "BEAM_INFER_TEMP": "gs://b/tmp"}


@pytest.fixture(scope="module")
def venv_python():
    return str(airflow_python())


def probe(venv_python, tmp_path, mode: str, dag_env: dict) -> dict:
    """Runs airflow_probe.py in the Airflow venv, from the repo root (so `-m pipelines.run` is this checkout's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEAM_INFER_", "GCP_", "AIRFLOW"))}
    env.pop("PYTHONPATH", None)  # the venv's own packages only
    env |= {"AIRFLOW_HOME": str(tmp_path / "airflow_home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": '{"conn_type": "google_cloud_platform"}',
            "BEAM_INFER_PYTHON": sys.executable, **dag_env}
    proc = subprocess.run([venv_python, PROBE, str(AIRFLOW_DIR), mode], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["import_errors"] == {} and report["dag_ids"] == ["beam_infer_classify"], report
    return report


def test_dag_loads_and_the_operator_runs_python_m_pipelines_run_on_dataflow_with_the_gpu_flags(venv_python,
                                                                                              tmp_path):
    report = probe(venv_python, tmp_path, "capture", DATAFLOW_ENV)
    assert (report["operator"], report["py_file"], report["py_options"]) == \
        ("BeamRunPythonPipelineOperator", "pipelines.run", ["-m"])
    (argv,) = report["commands"]
    assert argv[:4] == [sys.executable, "-m", "pipelines.run", "--runner=DataflowRunner"]
    args = argv[4:]
    # Added by the operator's Dataflow path: the job is named after the DAG's job_name plus a unique suffix.
    assert {"--project=p", "--region=europe-west4", "--labels=airflow-version=v3-3-2"} <= set(args)
    assert [a for a in args if a.startswith("--job_name=beam-infer-classify-")]
    # From the DAG.
    assert {"--input=gs://b/images/*.jpg", "--output=gs://b/out", "--gpu-type=nvidia-l4", f"--worker-image={IMAGE}",
            "--temp_location=gs://b/tmp", "--batch-size=256"} <= set(args)
    assert report["waited_on_dataflow"]

    # The same argv through pipelines.run's own argument handling gives the Dataflow GPU job.
    parsed, beam_args = run.parse_args(argv[3:])
    options = PipelineOptions([f"--runner={parsed.runner}", *dataflow_args(parsed, beam_args)])
    assert (parsed.input, parsed.output, parsed.batch_size) == ("gs://b/images/*.jpg", "gs://b/out", 256)
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.labels) == ("p", "europe-west4", ["airflow-version=v3-3-2"])
    assert cloud.dataflow_service_options == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert (options.view_as(WorkerOptions).sdk_container_image, options.view_as(WorkerOptions).machine_type) == \
        (IMAGE, "g2-standard-8")
    assert "no_use_multiple_sdk_containers" in options.view_as(DebugOptions).experiments


def test_dag_on_the_direct_runner_runs_pipelines_run_for_real_and_writes_predictions(venv_python, tmp_path,
                                                                                     sample_dir):
    out = tmp_path / "out"
    report = probe(venv_python, tmp_path, "run", {"BEAM_INFER_RUNNER": "DirectRunner",
                                                   "BEAM_INFER_INPUT": str(sample_dir / "manifest.jsonl"),
                                                   "BEAM_INFER_OUTPUT": str(out)})
    (argv,) = report["commands"]
    assert argv[:4] == [sys.executable, "-m", "pipelines.run", "--runner=DirectRunner"]
    assert not [a for a in argv if a.startswith(("--gpu-type", "--worker-image", "--project", "--job_name"))]
    assert not report["waited_on_dataflow"]
    rows = pq.read_table(glob.glob(str(out / "predictions-*-of-*.parquet"))).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"shape-{i:05d}" for i in range(48)]
    assert sum(r["top_labels"][0] == r["label"] for r in rows) >= 46
