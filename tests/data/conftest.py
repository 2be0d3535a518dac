"""Fixtures for the data tests: small shard datasets and an http server on 127.0.0.1 (the moto S3 server is in
tests/conftest.py, shared with the training tests).

The server binds a free port on loopback, lives for the test session, and is stopped at its end.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.data import write_synthetic_dataset
from tests.conftest import free_port


class _Handler(http.server.SimpleHTTPRequestHandler):
    hang: ClassVar[set[str]] = set()  # paths (relative to the served folder) that stall longer than any client timeout

    def do_GET(self) -> None:
        if self.path.lstrip("/") in self.hang:
            time.sleep(3)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, set[str]]]:
    """(base URL, served folder, set of paths to stall) of a threaded http server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("http")
    hang: set[str] = set()
    handler = type("Handler", (_Handler,), {"hang": hang})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(handler, directory=str(root))
    )
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, hang
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """60 labelled, captioned 16px samples in 6 shards of 10 (plenty of shards for 2 ranks x 2 workers)."""
    root = tmp_path_factory.mktemp("stream") / "ds"
    write_synthetic_dataset(str(root), n=60, resolution=16, seed=3, samples_per_shard=10)
    return str(root)
