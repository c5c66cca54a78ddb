"""Running against a Cloud Storage emulator (STORAGE_EMULATOR_HOST, e.g. fake-gcs-server) without waiting on
Google credentials that an emulator does not need.

Both clients of gs:// honour STORAGE_EMULATOR_HOST for the endpoint, but:
- Beam's gs:// filesystem (GcsIO, used by WriteToParquet, fileio, FileSystems) looks up Google credentials once
  per process before its first request, with 4 retries and exponential backoff: without credentials it waits
  about 20 s, logs 4 warnings with stack traces, then connects anonymously, which is what an emulator takes.
  `--no_auth` does not help: in Beam 2.77 GcsIO never reads it (only the Dataflow client does).
- gcsfs (2026.10 here) defaults to an "extended" filesystem (chosen when gcsfs is imported, from
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT) that asks a gRPC storage-control API for each bucket's layout; an emulator
  does not speak it, so each call logs a warning, and with token="anon" each call waits on it (about 45 s; its
  retry deadline is 60 s).
"""

from __future__ import annotations

import logging
import os
import sys

EMULATOR_HOST = "STORAGE_EMULATOR_HOST"
GCSFS_ZB_HNS = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
# Imported by each SDK worker process at its start (Beam's --beam_plugin), where it skips the same look-up.
BEAM_PLUGIN = "beam_infer.io.gcs_emulator_plugin"

_LOG = logging.getLogger(__name__)


def prepare_storage_emulator(beam_args: list[str]) -> list[str]:
    """Readies this process and the job's workers for the emulator at STORAGE_EMULATOR_HOST; a no-op (returns
    `beam_args` unchanged) when it is not set. Call it before the pipeline touches gs://.

    Sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false unless it is set (also for gcsfs already imported: then the
    plain GCSFileSystem is registered for gs:// with fsspec), makes Beam's gs:// filesystem connect
    anonymously at once in this process, and returns `beam_args` with
    `--beam_plugin=beam_infer.io.gcs_emulator_plugin` (unless given), which does the same in every SDK worker
    process the runner starts. Process-wide and for the process's life: Beam's credentials cache serves its
    other Google clients too (BigQuery, Dataflow's API), which then connect anonymously as well.
    """
    if not os.environ.get(EMULATOR_HOST):
        return list(beam_args)
    prepare_process()
    from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

    if BEAM_PLUGIN in (PipelineOptions(beam_args).view_as(SetupOptions).beam_plugins or []):
        return list(beam_args)
    return [*beam_args, f"--beam_plugin={BEAM_PLUGIN}"]


def gcsfs_storage_options() -> dict[str, str]:
    """fsspec storage options for gs:// on the emulator: {"token": "anon"} when STORAGE_EMULATOR_HOST is set,
    else none.

    Without them gcsfs also ends up anonymous, but only after trying Application Default Credentials and the GCE
    metadata server (fast where that answers or is refused, seconds where it is unreachable), and it uses a
    developer's own credentials against the emulator when it finds them. Use it only with the plain
    GCSFileSystem (see prepare_storage_emulator): the extended one waits about 45 s per call with an anonymous
    token.
    """
    return {"token": "anon"} if os.environ.get(EMULATOR_HOST) else {}


def storage_options(url: str) -> dict[str, str]:
    """fsspec storage options for `url`: gcsfs_storage_options() for gs:// and gcs://, else none."""
    return gcsfs_storage_options() if url.startswith(("gs://", "gcs://")) else {}


def prepare_process() -> None:
    """This process, for the emulator: gcsfs (prepare_gcsfs) and Beam's gs:// filesystem
    (skip_beam_credential_lookup)."""
    prepare_gcsfs()
    skip_beam_credential_lookup()


def prepare_gcsfs() -> None:
    """With STORAGE_EMULATOR_HOST set, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (unless set) and gcsfs's plain
    filesystem for gs://; nothing otherwise."""
    if os.environ.get(EMULATOR_HOST):
        os.environ.setdefault(GCSFS_ZB_HNS, "false")
        _register_plain_gcsfs()


def skip_beam_credential_lookup() -> None:
    """Makes Beam's gs:// filesystem in this process connect anonymously without looking up credentials.

    It presets Beam's process-wide credentials cache (apache_beam.internal.gcp.auth._Credentials, private) to
    "none found", the result Beam itself caches after its retries; credentials already looked up are kept.
    If a Beam release drops that cache, this only logs a warning and Beam waits as before.
    """
    from apache_beam.internal.gcp import auth

    cache = getattr(auth, "_Credentials", None)
    if not all(hasattr(cache, name) for name in ("_credentials_lock", "_credentials_init", "_credentials")):
        _LOG.warning("beam_infer: this Beam has no credentials cache to preset; its gs:// filesystem will look up "
                     "Google credentials (and wait without them) before using the emulator at %s",
                     os.environ.get(EMULATOR_HOST))
        return
    with cache._credentials_lock:
        if not cache._credentials_init:
            cache._credentials = None
            cache._credentials_init = True


def _register_plain_gcsfs() -> None:
    """Where gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set (it reads it only then),
    registers the plain GCSFileSystem for gs:// and gcs:// with fsspec, as that setting would have."""
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is None or os.environ[GCSFS_ZB_HNS].lower() in ("true", "1"):
        return
    import fsspec
    from gcsfs.core import GCSFileSystem

    for protocol in ("gs", "gcs"):
        if fsspec.get_filesystem_class(protocol) is not GCSFileSystem:
            fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
