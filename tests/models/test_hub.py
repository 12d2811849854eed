"""Download, checksum and cache behaviour, against a local HTTP server on 127.0.0.1."""

import hashlib

import pytest

from dfq.errors import ChecksumError, DFQError
from dfq.hub import RemoteFile, dfq_home, fetch


def _publish(root, name, payload):
    (root / name).write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


def test_download_verify_and_cache(http_server):
    root, url, requests = http_server
    sha = _publish(root, "w.bin", b"weights" * 1000)
    remote = RemoteFile((f"{url}/w.bin",), "w.bin", sha256=sha)
    path = fetch(remote, "weights", progress=False)
    assert path == dfq_home() / "weights" / "w.bin"
    assert path.read_bytes() == b"weights" * 1000
    assert requests == ["/w.bin"]
    # Second call: served from the cache, no request.
    assert fetch(remote, "weights", progress=False) == path
    assert requests == ["/w.bin"]


def test_cached_file_is_used_offline(http_server, monkeypatch):
    root, url, _requests = http_server
    sha = _publish(root, "w.bin", b"abc")
    remote = RemoteFile((f"{url}/w.bin",), "w.bin", sha256=sha)
    fetch(remote, progress=False)
    monkeypatch.setenv("DFQ_OFFLINE", "1")
    assert fetch(remote, progress=False).read_bytes() == b"abc"
    missing = RemoteFile((f"{url}/other.bin",), "other.bin", sha256=sha)
    with pytest.raises(DFQError, match="DFQ_OFFLINE"):
        fetch(missing, progress=False)


def test_hash_prefix_as_published_in_file_names(http_server):
    root, url, _ = http_server
    sha = _publish(root, "resnet-x.th", b"xyz")
    assert fetch(RemoteFile((f"{url}/resnet-x.th",), "resnet-x.th", sha256=sha[:8]), progress=False).is_file()


def test_wrong_checksum_download_leaves_nothing_behind(http_server):
    root, url, _ = http_server
    _publish(root, "w.bin", b"tampered")
    remote = RemoteFile((f"{url}/w.bin",), "w.bin", sha256="0" * 64)
    with pytest.raises(DFQError, match="sha256"):
        fetch(remote, progress=False)
    assert list((dfq_home()).iterdir()) == []  # no partial or bad file in the cache


def test_corrupted_cache_is_an_error_not_a_silent_redownload(http_server):
    root, url, requests = http_server
    sha = _publish(root, "w.bin", b"good")
    remote = RemoteFile((f"{url}/w.bin",), "w.bin", sha256=sha)
    path = fetch(remote, progress=False)
    path.write_bytes(b"evil")
    with pytest.raises(ChecksumError, match="delete it"):
        fetch(remote, progress=False)
    assert len(requests) == 1


def test_mirrors_are_tried_in_order(http_server):
    root, url, requests = http_server
    sha = _publish(root, "w.bin", b"data")
    remote = RemoteFile((f"{url}/missing/w.bin", f"{url}/w.bin"), "w.bin", sha256=sha)
    assert fetch(remote, progress=False).read_bytes() == b"data"
    assert requests == ["/missing/w.bin", "/w.bin"]


def test_unreachable_server_is_a_clear_error():
    remote = RemoteFile(("http://127.0.0.1:9/nothing.bin",), "nothing.bin", sha256="0" * 64)
    with pytest.raises(DFQError, match=r"could not download nothing\.bin"):
        fetch(remote, progress=False)


def test_remote_file_requires_a_checksum():
    with pytest.raises(ValueError):
        RemoteFile(("http://x/y",), "y")
