"""Runner choice: DirectRunner means Beam's in-process FnApiRunner here, with no attempt to fetch Prism; and
PortableRunner with the embedded job service runs the SDK harness in this process unless told otherwise.

Beam 2.77's DirectRunner first tries to download and start the Prism runner binary, which needs the network;
beam_infer's default path must work offline, so "DirectRunner" resolves to the runner below. Every other runner
is Beam's own: FlinkRunner with --flink_master=[local] and SparkRunner with --spark_master_url=local[N] already
default to a LOOPBACK harness.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions
from apache_beam.runners.portability.portable_runner import PortableRunner
from apache_beam.runners.runner import PipelineRunner
from apache_beam.transforms.environments import Environment

_DIRECT_NAMES = (None, "", "DirectRunner", "direct", "InProcessDirectRunner")


class InProcessDirectRunner(PipelineRunner):
    """Beam's FnApiRunner, as DirectRunner uses it for batch pipelines, minus the Prism attempt.

    Honours --direct_running_mode (in_memory, multi_threading, multi_processing) and --direct_num_workers.
    """

    def run_pipeline(self, pipeline, options):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=info).run_pipeline(pipeline, options)


class EmbeddedLoopbackPortableRunner(PortableRunner):
    """PortableRunner that, with --job_endpoint=embed and no --environment_type, runs the SDK harness in this
    process (LOOPBACK), as Beam does for a local Flink or Spark. Beam's default there, a DOCKER harness from
    Beam's stock image, would have neither torch nor beam_infer."""

    def default_environment(self, options: PipelineOptions) -> Environment:
        portable = options.view_as(PortableOptions)
        if portable.job_endpoint == "embed" and not portable.environment_type:
            portable.environment_type = "LOOPBACK"
        return super().default_environment(options)


def resolve_runner(options: PipelineOptions) -> PipelineRunner | None:
    """The runner object to pass to beam.Pipeline: ours for DirectRunner and PortableRunner, None (Beam's choice)
    otherwise."""
    name = options.view_as(StandardOptions).runner
    if name in _DIRECT_NAMES:
        return InProcessDirectRunner()
    return EmbeddedLoopbackPortableRunner() if name == "PortableRunner" else None
