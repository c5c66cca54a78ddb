"""Reads the bytes behind a URI with fsspec: local paths, file://, gs:// (gcsfs), s3://, http(s)://, memory://."""

from __future__ import annotations

import fsspec


def fetch_bytes(uri: str) -> bytes:
    """Returns the whole content of `uri`.

    Raises:
        FileNotFoundError, PermissionError, OSError: the URI cannot be read.
    """
    with fsspec.open(uri, "rb") as f:
        return f.read()
