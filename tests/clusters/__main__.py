"""`python -m tests.clusters flink|spark up|down`: starts a local cluster with its Beam worker pool and leaves it
running (printing the flags that run the job on it), or stops the one started before.

The state of a running cluster (its work folder, process groups and job flags) is kept in
`<tempdir>/beam_infer_clusters/<name>.json`, so that `down`, from another shell, can stop it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import tempfile

from tests.clusters.common import stop_groups

# name -> "module:class"; a class takes a work folder, has start(), stop(), job_flags() and `processes`.
CLUSTERS = {
    "flink": "tests.clusters.flink:FlinkCluster",
    "spark": "tests.clusters.spark:SparkCluster",
}
STATE_DIR = os.path.join(tempfile.gettempdir(), "beam_infer_clusters")


def _state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def cluster_class(name: str):
    module, _, cls = CLUSTERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def up(name: str) -> int:
    if os.path.exists(_state_path(name)):
        print(f"a {name} cluster is up already ({_state_path(name)}); `python -m tests.clusters {name} down` first",
              file=sys.stderr)
        return 1
    work_dir = tempfile.mkdtemp(prefix=f"beam_infer_{name}_cluster_")
    cluster = cluster_class(name)(work_dir)
    cluster.start()
    try:
        flags = cluster.job_flags()
    except BaseException:
        cluster.stop()
        raise
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(_state_path(name), "w") as f:
        json.dump({"work_dir": work_dir, "pgids": cluster.processes.groups(), "flags": flags}, f)
    print(f"{name} cluster up; logs in {cluster.processes.log_dir}; stop it with `python -m tests.clusters {name} "
          "down`. Run the job on it with:")
    env = getattr(cluster, "driver_env", None)
    prefix = ""
    if env is not None:  # variables the launcher needs (Spark)
        extra = {k: v for k, v in env().items() if os.environ.get(k) != v}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + (" " if extra else "")
    print(f"{prefix}python -m pipelines.run --input <manifest or glob> --output <dir> {shlex.join(flags)}")
    return 0


def down(name: str) -> int:
    try:
        with open(_state_path(name)) as f:
            state = json.load(f)
    except FileNotFoundError:
        print(f"no {name} cluster is up (no {_state_path(name)})", file=sys.stderr)
        return 1
    stop_groups(state["pgids"])
    os.remove(_state_path(name))
    print(f"{name} cluster stopped (its files stay in {state['work_dir']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.clusters", description=__doc__.splitlines()[0])
    parser.add_argument("cluster", choices=sorted(CLUSTERS))
    parser.add_argument("action", choices=("up", "down"))
    args = parser.parse_args(argv)
    return up(args.cluster) if args.action == "up" else down(args.cluster)


if __name__ == "__main__":
    sys.exit(main())
