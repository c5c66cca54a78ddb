import pytest

from beam_infer.io.fetch import fetch_bytes, open_uri

pytestmark = pytest.mark.timeout(30)


def test_local_paths_and_home_relative_paths_read_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"\x00\x01payload")
    assert fetch_bytes(str(tmp_path / "x.bin")) == fetch_bytes("~/x.bin") == b"\x00\x01payload"
    with open_uri("~/x.bin", "rb") as f:
        assert f.read() == b"\x00\x01payload"


def test_a_url_is_read_through_fsspec():
    import fsspec

    fsspec.filesystem("memory").pipe("memory://fetch_test/y.bin", b"remote")
    assert fetch_bytes("memory://fetch_test/y.bin") == b"remote"


def test_a_missing_local_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        fetch_bytes(str(tmp_path / "missing.jpg"))
