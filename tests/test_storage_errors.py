"""What goes wrong with a URL the user gave (no credentials, no such bucket, credentials rejected, an endpoint that
cannot be reached) is one line naming the URL and the cause, and exit status 2: for a training's data and run dir,
`data inspect`, `export` and `eval`, against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.storage import storage_failure
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE, free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _env(endpoint: str, credentials: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")  # fmt: skip
    if credentials:
        env.update(CREDENTIALS)
    return env


def _ganpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _train(tmp_path: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return _ganpipe(env, "train", TINY_RECIPE, *FAST_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}", *overrides)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("ganpipe: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[str]:
    """A second moto server that checks credentials (every access key is unknown to it): requests are refused."""
    pytest.importorskip("moto.server")
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def test_no_credentials(s3_endpoint: str, tmp_path: Path) -> None:
    env = _env(s3_endpoint, credentials=False)
    line = _one_line(_train(tmp_path, env, "data.url=s3://some-bucket/ds", f"run_dir={tmp_path / 'run'}"))
    assert "'s3://some-bucket/ds/manifest.json': no credentials: set AWS_ACCESS_KEY_ID" in line
    line = _one_line(_train(tmp_path, env, "run_dir=s3://some-bucket/run"))
    assert line.startswith("ganpipe: error: run_dir 's3://some-bucket/run': no credentials")


def test_no_such_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    env = _env(s3_endpoint)
    line = _one_line(_train(tmp_path, env, "data.url=s3://missing-bucket/ds", f"run_dir={tmp_path / 'run'}"))
    assert "'s3://missing-bucket/ds/manifest.json': no such bucket: create the bucket or fix the URL" in line
    line = _one_line(_ganpipe(env, "data", "inspect", "s3://missing-bucket/ds"))
    assert "no such bucket" in line and "s3://missing-bucket/ds" in line
    line = _one_line(_ganpipe(env, "export", "s3://missing-bucket/run", "--out", str(tmp_path / "e")))
    assert "'s3://missing-bucket/run' does not exist" in line  # s3fs answers "exists?" with no for a missing bucket


def test_credentials_rejected(strict_s3: str, tmp_path: Path) -> None:
    env = _env(strict_s3)
    line = _one_line(_train(tmp_path, env, "data.url=s3://some-bucket/ds", f"run_dir={tmp_path / 'run'}"))
    assert "'s3://some-bucket/ds/manifest.json': permission denied" in line
    line = _one_line(_ganpipe(env, "eval", "s3://some-bucket/run", "--metrics", "fid8"))
    assert line.startswith("ganpipe: error: source 's3://some-bucket/run': permission denied")


def test_unreachable_endpoint(tmp_path: Path) -> None:
    env = _env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    line = _one_line(_train(tmp_path, env, "data.url=s3://some-bucket/ds", f"run_dir={tmp_path / 'run'}"))
    assert "'s3://some-bucket/ds/manifest.json': the endpoint cannot be reached: check the network" in line
    line = _one_line(_train(tmp_path, env, "run_dir=s3://some-bucket/run"))
    assert line.startswith("ganpipe: error: run_dir 's3://some-bucket/run': the endpoint cannot be reached")


def test_only_storage_failures_are_called_storage_failures(tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    assert storage_failure(ValueError("bad value")) is None
    assert storage_failure(FileNotFoundError("/nowhere")) is None
    missing = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}}, "Get")
    try:
        raise FileNotFoundError("s3://missing/x") from missing  # what s3fs raises
    except FileNotFoundError as e:
        assert storage_failure(e) == "no such bucket"
    # A PermissionError, DNS failure or timeout of something else (wandb, a download) is not the storage's.
    elsewhere = PermissionError(13, "Permission denied", "/dev/shm/wandb-123")
    assert storage_failure(elsewhere) is None and storage_failure(elsewhere, str(tmp_path / "run")) is None
    assert storage_failure(socket.gaierror(-2, "Name or service not known")) is None
    # ... but one about the URL the user gave is: a file below it, or a folder above it that could not be made.
    assert storage_failure(PermissionError(13, "denied", str(tmp_path / "run" / "x.pt")), str(tmp_path / "run")) == (
        "permission denied"
    )
    assert (
        storage_failure(PermissionError(13, "denied", str(tmp_path)), f"file://{tmp_path}/run") == "permission denied"
    )
    # A chain that hides its context (raise ... from None) hides it here too.
    try:
        try:
            raise missing
        except ClientError:
            raise ValueError("a bad config value") from None
    except ValueError as e:
        assert storage_failure(e) is None


def test_a_read_only_local_run_dir_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead, which no one can write below
        (tmp_path / "parent").write_text("a file, not a folder")
    else:
        (tmp_path / "parent").mkdir(mode=0o500)
    line = _one_line(_train(tmp_path, dict(os.environ), f"run_dir={tmp_path / 'parent' / 'run'}"))
    assert line.startswith(f"ganpipe: error: run_dir '{tmp_path / 'parent' / 'run'}': ")
