"""Shared fixtures: a tiny, fast StyleGAN2 config on a small synthetic dataset in a temporary cache, and a moto S3
server on 127.0.0.1 (a free loopback port, for the whole session)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(REPO / "recipes" / "stylegan2" / "tiny.yaml")

# Small enough that a few training steps take seconds on 2 CPU cores, big enough to use every phase.
FAST_OVERRIDES = [
    "data.resolution=16",
    "data.batch_size=8",
    "data.synth.n=64",
    "model.z_dim=16",
    "model.w_dim=16",
    "model.synthesis.channel_base=256",
    "model.synthesis.channel_max=16",
    "model.discriminator.channel_base=256",
    "model.discriminator.channel_max=16",
    "train.progress_bar=false",
    "logger.csv=false",
    "eval.metrics=[]",
]


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(*overrides) -> Config for a fast run in tmp_path (run dir and dataset cache)."""

    def make(*overrides: str) -> Config:
        base = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *FAST_OVERRIDES]
        return load_config(TINY_RECIPE, [*base, *overrides])

    return make


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread for the test, restored afterwards: tiny tensors (and float16 convolutions on
    the CPU) spend most of their time in OpenMP synchronisation when several threads share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server; AWS_* variables point botocore/s3fs (and loader workers, which inherit them) at it."""
    pytest.importorskip("moto.server")
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
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
