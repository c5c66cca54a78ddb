"""Naming and writing output objects: a record id becomes one safe object name under an output prefix, and a
local file appears complete under its final name or not at all."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import uuid

from beam_infer.io.fetch import is_local, local_path

_MAX_NAME_BYTES = 200  # under the 255 bytes most file systems allow a name, with room for a suffix and a temp tag


def safe_object_name(record_id: str) -> str:
    """One object name per record id, that stays inside any prefix it is put under.

    Every byte but letters, digits and `_.-~` is percent-encoded (so `/`, `\\`, NUL and control characters cannot
    make a path), a leading "." becomes "%2E" (no `.`, `..` or hidden names), and a name longer than 200 bytes
    keeps its first 168 and a hash of the whole: 201 bytes, a length no unhashed name has, so distinct ids give
    distinct names (up to a 128-bit hash collision).

    Raises:
        ValueError: the id is empty.
    """
    if not record_id:
        raise ValueError("a record needs an id or a uri to name its output object")
    name = urllib.parse.quote(record_id, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _MAX_NAME_BYTES:
        name = f"{name[:168]}-{hashlib.sha256(record_id.encode()).hexdigest()[:32]}"
    return name


def object_uri(prefix: str, record_id: str, suffix: str = "") -> str:
    """`<prefix>/<safe name of record_id><suffix>`, for a Blob. The suffix is the task's (".png"), never the id's.

    Raises:
        ValueError: the id is empty, or the suffix holds a path separator.
    """
    if "/" in suffix or "\\" in suffix or "\x00" in suffix:
        raise ValueError(f"an object suffix cannot hold a path separator or NUL: {suffix!r}")
    return f"{prefix.rstrip('/')}/{safe_object_name(record_id)}{suffix}"


def write_local_atomically(uri: str, data: bytes) -> None:
    """Writes `data` to a local path under a temporary name in the same directory, then renames it into place:
    a reader sees the whole file or none. Creates missing directories.

    Raises:
        OSError: the file cannot be written (the temporary file is removed).
    """
    path = local_path(uri)
    directory, name = os.path.split(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def is_local_uri(uri: str) -> bool:
    return is_local(uri) or uri.startswith("file://")
