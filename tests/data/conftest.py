"""Fixtures for the data tests: small shard datasets, a moto S3 server and an http server on 127.0.0.1.

Both servers bind free ports on loopback, live for the test session, and are stopped at its end.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.data import write_synthetic_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server; AWS_* variables point botocore/s3fs (and loader workers, which inherit them) at it."""
    pytest.importorskip("moto.server")
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield url
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test: s3://NAME."""
    import s3fs

    name = "ganpipe-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{time.monotonic_ns() % 10**6}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return f"s3://{name}"


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
        ("127.0.0.1", _free_port()), functools.partial(handler, directory=str(root))
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
