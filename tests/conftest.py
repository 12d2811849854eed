"""Shared fixtures: the real data in ../shared/data (skipped when absent) and a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESNET20_WEIGHTS = SHARED_DATA / "resnet20-12fca82f.th"
CIFAR10_4CLASS = SHARED_DATA / "cifar10-test-4class-lossless.npz"
CIFAR10_JPEG = SHARED_DATA / "cifar10-test-jpeg75.npz"


def require_shared(*paths: Path) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"real data not found in {SHARED_DATA} ({', '.join(missing)}); see README 'Data'")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_server(tmp_path):
    """Serve ``tmp_path / "www"`` on 127.0.0.1; yields (root_dir, base_url, request_log)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny batches: intra-op threads gain nothing, and on a busy 2-core machine they cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache or the network by accident."""
    monkeypatch.setenv("DFQ_HOME", str(tmp_path / "dfq_home"))


@pytest.fixture(autouse=True)
def _allocator_left_alone(monkeypatch):
    """CLI tests call ``dfq.cli.main`` in this process: the allocator it sets up would outlive the test."""
    monkeypatch.setattr("dfq.cli.reuse_freed_memory", lambda: False)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of a randomly initialised resnet20a_cifar10, so nothing is downloaded."""
    from dfq.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet20a_random.pt"
    torch.save(create_model("resnet20a_cifar10").state_dict(), path)
    return path
