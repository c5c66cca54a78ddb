"""Airflow DAG: beam_infer's job (`python -m pipelines.run`) on Dataflow with a GPU, via the Apache Beam provider.

The Airflow worker runs `BEAM_INFER_PYTHON -m pipelines.run --runner=… --input=… …` in a subprocess; that
interpreter needs beam_infer installed (the Docker image of docker/Dockerfile has it, and it matches the workers'
Python and Beam versions). On Dataflow the operator also passes --project, --region, --job_name and --labels,
reads the job id from the job's log, links the job, waits for it through the Dataflow API and cancels it when the
task is killed (that needs apache-airflow-providers-google next to the Beam provider).

Set in the Airflow workers' environment (read when this file is parsed):
    BEAM_INFER_INPUT     gs:// glob or manifest of the images            (Dataflow: required)
    BEAM_INFER_OUTPUT    gs:// directory for the Parquet outputs         (Dataflow: required)
    BEAM_INFER_IMAGE     the worker image built from docker/Dockerfile   (Dataflow: required)
    GCP_PROJECT, GCP_REGION, BEAM_INFER_TEMP (gs:// temp location)      (Dataflow: required)
    BEAM_INFER_GPU       Dataflow accelerator type, default nvidia-l4
    BEAM_INFER_MODEL     default shapes_net
    BEAM_INFER_RUNNER    default DataflowRunner; DirectRunner runs on the Airflow worker itself
    BEAM_INFER_PYTHON    interpreter with beam_infer installed, default python3
"""

from __future__ import annotations

import os

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.sdk import DAG

env = os.environ.get
RUNNER = env("BEAM_INFER_RUNNER", "DataflowRunner")
ON_DATAFLOW = RUNNER.lower() in ("dataflowrunner", "dataflow")

# Keys are pipelines.run's flags as written on its command line (the provider turns {"k": v} into --k=v).
pipeline_options = {
    "input": env("BEAM_INFER_INPUT"),  # None: the operator leaves it out (DirectRunner: the built-in sample)
    "output": env("BEAM_INFER_OUTPUT", "beam_infer_output"),
    "model": env("BEAM_INFER_MODEL", "shapes_net"),
    "batch-size": 256,
}
dataflow_config = None
if ON_DATAFLOW:
    pipeline_options |= {
        "gpu-type": env("BEAM_INFER_GPU", "nvidia-l4"),
        "worker-image": env("BEAM_INFER_IMAGE"),
        "temp_location": env("BEAM_INFER_TEMP"),
    }
    dataflow_config = {"job_name": "beam-infer-classify", "project_id": env("GCP_PROJECT"),
                       "location": env("GCP_REGION", "us-central1"), "wait_until_finished": True}

with DAG(
    dag_id="beam_infer_classify",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["beam_infer"],
):
    BeamRunPythonPipelineOperator(
        task_id="classify",
        runner=RUNNER,
        py_file="pipelines.run",
        py_options=["-m"],
        py_interpreter=env("BEAM_INFER_PYTHON", "python3"),
        pipeline_options=pipeline_options,
        dataflow_config=dataflow_config,
    )
