"""Runs inside the Airflow virtualenv (see airflow_venv.py): loads the example DAGs with a real DagBag and
executes the Beam operator, printing one JSON object on the last line of stdout.

    python airflow_probe.py DAG_FOLDER run       # the operator runs its command for real (a local runner)
    python airflow_probe.py DAG_FOLDER capture   # the command is recorded, not run

Either way the command the provider builds is recorded (`commands`), and the Dataflow API wait is replaced,
so nothing reaches Google.
"""

import json
import sys
from unittest import mock

from airflow.dag_processing.dagbag import DagBag
from airflow.providers.apache.beam.hooks import beam as beam_hook


def main(dag_folder: str, mode: str) -> dict:
    bag = DagBag(dag_folder=dag_folder)
    report = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dag_ids)}
    if report["import_errors"]:
        return report
    task = bag.dags["beam_infer_classify"].get_task("classify")  # get_dag() would consult the metadata DB
    report |= {"operator": type(task).__name__, "runner": task.runner, "py_file": task.py_file,
               "py_options": task.py_options, "py_interpreter": task.py_interpreter}
    commands = []
    run_for_real = beam_hook.run_beam_command

    def record(cmd, **kwargs):
        commands.append(cmd)
        if mode == "run":
            run_for_real(cmd, **kwargs)

    with mock.patch.object(beam_hook, "run_beam_command", side_effect=record), \
            mock.patch("airflow.providers.google.cloud.hooks.dataflow.DataflowHook.wait_for_done") as wait:
        task.execute({"ti": mock.MagicMock()})  # the task instance only receives XComs (the Dataflow job id)
    return report | {"commands": commands, "waited_on_dataflow": wait.called}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
