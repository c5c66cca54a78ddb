"""Real clusters on this machine for the cluster-marked tests: a Flink session cluster and a Spark standalone
cluster, each with a Beam worker pool (EXTERNAL environment) whose SDK workers run this interpreter.

`python -m tests.clusters flink|spark up|down` starts or stops one by hand and prints the job flags.
"""
