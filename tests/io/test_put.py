import os

import pytest

from beam_infer.io.put import object_uri, safe_object_name, write_local_atomically
from beam_infer.task import Blob

pytestmark = pytest.mark.timeout(30)

HOSTILE_IDS = ["../x", "..", ".", "/abs/path", "a/b", "a\\b", "nul\x00x", "ctrl\x07\n", ".hidden", "%2F", "ünï"]


@pytest.mark.parametrize("rid", HOSTILE_IDS)
def test_an_object_name_is_one_plain_segment_whatever_the_id(rid):
    name = safe_object_name(rid)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert all(32 < ord(ch) < 127 for ch in name)


def test_distinct_ids_give_distinct_names_also_past_the_length_limit():
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    names = {safe_object_name(rid) for rid in [*HOSTILE_IDS, long_a, long_b, safe_object_name(long_a)[:200]]}
    assert len(names) == len(HOSTILE_IDS) + 3
    assert max(len(safe_object_name(long_a)), len(safe_object_name(long_b))) == 201


def test_an_empty_id_or_a_suffix_with_a_separator_is_refused():
    with pytest.raises(ValueError, match="id"):
        safe_object_name("")
    with pytest.raises(ValueError, match="separator"):
        object_uri("gs://b/out", "x", "/../y")


def test_object_uris_stay_under_their_prefix():
    assert object_uri("gs://b/out/", "../../etc/passwd", ".png") == "gs://b/out/%2E.%2F..%2Fetc%2Fpasswd.png"


def test_a_local_write_leaves_the_whole_file_or_nothing(tmp_path, monkeypatch):
    write_local_atomically(str(tmp_path / "d" / "x.bin"), b"whole")
    assert (tmp_path / "d" / "x.bin").read_bytes() == b"whole"

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_local_atomically(str(tmp_path / "d" / "y.bin"), b"partial")
    assert sorted(os.listdir(tmp_path / "d")) == ["x.bin"]


def test_a_blob_holds_bytes_from_any_buffer_or_list_of_buffers():
    assert Blob("u", bytearray(b"ab")).data == b"ab"
    assert Blob("u", memoryview(b"ab")).data == b"ab"
    assert Blob("u", [b"a", memoryview(b"b")]).data == b"ab"
