"""pytest fixtures for gs:// on loopback: `gcs_server` (one fake-gcs-server per session) and `gcs` (per test: a
fresh bucket behind a fresh FaultProxy, with STORAGE_EMULATOR_HOST pointing at the proxy).

Registered from tests/conftest.py (pytest_plugins).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.gcs.proxy import FaultProxy
from tests.gcs.server import GcsServer

GCSFS_ZB_HNS = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"


def pytest_configure(config: pytest.Config) -> None:
    """gcsfs picks its gs:// filesystem class once, when it is imported, from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
    (default on): the extended class asks a gRPC API the emulator lacks about each bucket, so it warns on every
    call, and waits about 45 s per call with token="anon". Setting it in a fixture is too late once any test
    module imported gcsfs, so it is set here, before collection, for the whole session unless already set."""
    os.environ.setdefault(GCSFS_ZB_HNS, "false")


@dataclass
class GcsBucket:
    """A fresh bucket on the emulator, reached by the code under test through `proxy` (STORAGE_EMULATOR_HOST).

    upload/download/list talk to the server directly: a test seeds and checks the bucket without the proxy's
    faults or counts, and without the client under test.
    """

    server: GcsServer
    proxy: FaultProxy
    bucket: str

    def url_of(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    def upload(self, name: str, data: bytes) -> None:
        self.server.upload(self.bucket, name, data)

    def download(self, name: str) -> bytes:
        return self.server.download(self.bucket, name)

    def list(self, prefix: str = "") -> list[str]:
        return self.server.list(self.bucket, prefix)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    with GcsServer() as server:
        yield server


def _clear_gcsfs_instances() -> None:
    """fsspec reuses a gcsfs instance for equal arguments, with its listings cache and connection pool: cleared,
    a test gets its own (its requests would reach the new proxy either way: gcsfs reads STORAGE_EMULATOR_HOST
    for each request)."""
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


@pytest.fixture
def gcs(gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcsBucket]:
    """A fresh bucket behind a fresh FaultProxy (no faults until the test configures some); STORAGE_EMULATOR_HOST
    is the proxy's URL, and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (for processes the test starts)."""
    with FaultProxy(gcs_server.url) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        monkeypatch.setenv(GCSFS_ZB_HNS, "false")
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        gcs_server.make_bucket(bucket)
        _clear_gcsfs_instances()
        yield GcsBucket(gcs_server, proxy, bucket)
        _clear_gcsfs_instances()
