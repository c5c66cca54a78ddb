"""beam_infer.io.gcs_env: gs:// on an emulator with no Google credentials looked up (tests/gcs: fake-gcs-server)."""

import importlib
import os
import socket
import subprocess
import sys

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.internal.gcp import auth

from beam_infer.io import gcs_env

PLUGIN = f"--beam_plugin={gcs_env.BEAM_PLUGIN}"


@pytest.fixture
def beam_credentials(monkeypatch):
    """Beam's process-wide credentials cache, empty for this test and restored after it (prepare_storage_emulator
    fills it)."""
    monkeypatch.setattr(auth._Credentials, "_credentials_init", False)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    return auth._Credentials


@pytest.fixture
def credential_lookups(monkeypatch):
    """Records every google.auth.default call, and fails it as on a machine without credentials."""
    import google.auth
    import google.auth.exceptions

    calls = []

    def default(*args, **kwargs):
        calls.append(args)
        raise google.auth.exceptions.DefaultCredentialsError("no credentials in this test")

    monkeypatch.setattr(google.auth, "default", default)
    return calls


def _unset(monkeypatch, name: str) -> None:
    """Unsets `name` for this test; set first, so that monkeypatch also removes what the code under test sets."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


@pytest.mark.timeout(30)
def test_without_an_emulator_nothing_changes(monkeypatch, beam_credentials):
    _unset(monkeypatch, gcs_env.EMULATOR_HOST)
    _unset(monkeypatch, gcs_env.GCSFS_ZB_HNS)
    assert gcs_env.prepare_storage_emulator(["--runner=DirectRunner"]) == ["--runner=DirectRunner"]
    assert gcs_env.GCSFS_ZB_HNS not in os.environ
    assert not beam_credentials._credentials_init
    assert gcs_env.gcsfs_storage_options() == {}


@pytest.mark.timeout(30)
def test_with_an_emulator_the_args_get_the_worker_plugin_once(monkeypatch, beam_credentials):
    monkeypatch.setenv(gcs_env.EMULATOR_HOST, "http://127.0.0.1:9")
    args = gcs_env.prepare_storage_emulator(["--runner=DirectRunner", "--beam_plugin=json"])
    assert args == ["--runner=DirectRunner", "--beam_plugin=json", PLUGIN]
    assert gcs_env.prepare_storage_emulator(args) == args
    assert gcs_env.prepare_storage_emulator([f"--beam_plugins={gcs_env.BEAM_PLUGIN}"]) == [
        f"--beam_plugins={gcs_env.BEAM_PLUGIN}"]


@pytest.mark.timeout(30)
def test_with_an_emulator_beam_is_set_to_connect_anonymously(monkeypatch, beam_credentials, credential_lookups):
    monkeypatch.setenv(gcs_env.EMULATOR_HOST, "http://127.0.0.1:9")
    gcs_env.prepare_storage_emulator([])
    assert beam_credentials._credentials_init and beam_credentials._credentials is None
    assert auth.get_service_credentials(beam.options.pipeline_options.PipelineOptions()) is None
    assert credential_lookups == []


@pytest.mark.timeout(30)
def test_gcsfs_extended_support_is_turned_off_unless_the_user_set_it(monkeypatch, beam_credentials):
    monkeypatch.setenv(gcs_env.EMULATOR_HOST, "http://127.0.0.1:9")
    _unset(monkeypatch, gcs_env.GCSFS_ZB_HNS)
    gcs_env.prepare_storage_emulator([])
    assert os.environ[gcs_env.GCSFS_ZB_HNS] == "false"
    monkeypatch.setenv(gcs_env.GCSFS_ZB_HNS, "true")
    gcs_env.prepare_storage_emulator([])
    assert os.environ[gcs_env.GCSFS_ZB_HNS] == "true"


@pytest.mark.timeout(30)
def test_gcsfs_imported_with_extended_support_gets_the_plain_class_for_gs(monkeypatch, beam_credentials):
    import fsspec
    from fsspec.registry import _registry
    from gcsfs.core import GCSFileSystem
    from gcsfs.extended_gcsfs import ExtendedGcsFileSystem

    for protocol in ("gs", "gcs"):  # as if gcsfs had been imported before the variable was set
        monkeypatch.setitem(_registry, protocol, ExtendedGcsFileSystem)
    monkeypatch.setenv(gcs_env.EMULATOR_HOST, "http://127.0.0.1:9")
    monkeypatch.setenv(gcs_env.GCSFS_ZB_HNS, "false")
    gcs_env.prepare_storage_emulator([])
    assert fsspec.get_filesystem_class("gs") is GCSFileSystem
    assert fsspec.get_filesystem_class("gcs") is GCSFileSystem


@pytest.mark.timeout(30)
def test_gcsfs_storage_options_are_anonymous_on_the_emulator(gcs):
    import fsspec

    gcs.upload("x", b"data")
    assert gcs_env.gcsfs_storage_options() == {"token": "anon"}
    fs = fsspec.filesystem("gs", **gcs_env.gcsfs_storage_options())
    assert fs.cat_file(gcs.url_of("x")) == b"data"


@pytest.mark.timeout(60)
def test_direct_runner_writes_parquet_to_the_emulator_without_a_credential_lookup(gcs, beam_credentials,
                                                                                   credential_lookups):
    schema = pa.schema([("id", pa.string()), ("x", pa.int64())])
    rows = [{"id": str(i), "x": i} for i in range(20)]
    args = gcs_env.prepare_storage_emulator(["--runner=DirectRunner"])
    with beam.Pipeline(argv=args) as pipeline:
        _ = (pipeline | beam.Create(rows)
             | beam.io.WriteToParquet(gcs.url_of("out/part"), schema, file_name_suffix=".parquet"))
    assert credential_lookups == []
    (name,) = gcs.list("out/")  # Beam's finalize renamed its temporary file (a batch copy, then a batch delete)
    assert name == "out/part-00000-of-00001.parquet"
    assert sorted(pq.read_table(pa.BufferReader(gcs.download(name))).to_pylist(), key=lambda r: r["x"]) == rows
    assert gcs.list() == [name]


@pytest.mark.timeout(30)
def test_beam_looks_up_credentials_without_it(gcs, beam_credentials, credential_lookups, monkeypatch):
    """The control for the test above: Beam's gs:// filesystem left alone looks up credentials (with retries;
    their sleeps are skipped here) before it connects anonymously."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.utils import retry

    monkeypatch.setattr(retry.Clock, "sleep", lambda self, seconds: None)
    gcs.upload("x", b"data")
    default_timeout = socket.getdefaulttimeout()
    try:
        assert [m.path for m in FileSystems.match([gcs.url_of("*")])[0].metadata_list] == [gcs.url_of("x")]
    finally:
        socket.setdefaulttimeout(default_timeout)  # the look-up sets a process-wide 60 s default
    assert len(credential_lookups) == 5  # a first try and 4 retries


@pytest.mark.timeout(30)
def test_importing_the_module_as_a_worker_plugin_skips_the_lookup_there(monkeypatch, beam_credentials):
    """What an SDK worker does with --beam_plugin=beam_infer.io.gcs_emulator_plugin: import it, with the
    launcher's environment."""
    from beam_infer.io import gcs_emulator_plugin

    monkeypatch.setenv(gcs_env.EMULATOR_HOST, "http://127.0.0.1:9")
    _unset(monkeypatch, gcs_env.GCSFS_ZB_HNS)
    importlib.reload(gcs_emulator_plugin)
    assert beam_credentials._credentials_init and beam_credentials._credentials is None
    assert os.environ[gcs_env.GCSFS_ZB_HNS] == "false"


@pytest.mark.timeout(60)
def test_importing_beam_infer_changes_no_credentials_even_with_the_emulator_variable_set():
    env = {**os.environ, gcs_env.EMULATOR_HOST: "http://127.0.0.1:9"}
    env.pop(gcs_env.GCSFS_ZB_HNS, None)
    code = ("import os, beam_infer, beam_infer.io.remote; from apache_beam.internal.gcp import auth; "
            "print(auth._Credentials._credentials_init, os.environ.get('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50)
    assert proc.stdout.split() == ["False", "None"], proc.stderr[-2000:]
