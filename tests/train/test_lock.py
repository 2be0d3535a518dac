"""One writer per run dir: the lease refuses a second training, is taken over from a dead or silent holder and
taken back by a requeued Slurm job, survives a race on an object store, and stops a run that lost it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.train.lock import LOCK_NAME, LockWatch, RunDirLocked, RunLock
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE


def _plant(run_dir: Path, **fields) -> None:
    """A lease as another training would have written it."""
    now = time.time()
    lease = {"token": "theirs", "host": "elsewhere", "pid": 4242, "job": None, "taken": now, "heartbeat": now}
    lease.update(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(lease))


def test_a_live_holder_is_refused_in_one_line(tmp_path: Path) -> None:
    _plant(tmp_path, host=os.uname().nodename, pid=os.getppid())  # a process that runs: our parent
    with pytest.raises(RunDirLocked, match=rf"is in use by another training \(pid {os.getppid()} on"):
        RunLock(str(tmp_path)).acquire()
    _plant(tmp_path, job="slurm:77")  # another host, fresh heartbeat
    with pytest.raises(RunDirLocked, match=r"\(job slurm:77, pid 4242 on elsewhere, last heartbeat \d+s ago\)"):
        RunLock(str(tmp_path)).acquire()


def test_dead_silent_and_requeued_holders_are_taken_over(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.train.lock")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(tmp_path, host=os.uname().nodename, pid=int(gone.stdout))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "which no longer runs" in caplog.text and lock.lease is not None
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()

    _plant(tmp_path, heartbeat=time.time() - 3600)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "taking over the stale lease of pid 4242 on elsewhere" in caplog.text
    lock.release()

    _plant(tmp_path, job="slurm:77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, restarted elsewhere after a requeue
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "taking back the lease of this job (slurm:77)" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.lease.token
    lock.release()


def test_two_starters_on_an_object_store_one_wins() -> None:
    url = f"memory://ganpipe-lock-race-{os.getpid()}"
    results: list[str] = []

    def start() -> None:
        try:
            RunLock(url, settle_s=0.3).acquire()
            results.append("took it")
        except RunDirLocked:
            results.append("refused")

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", "took it"]


def test_a_run_that_loses_its_lease_stops(tmp_path: Path) -> None:
    lock = RunLock(str(tmp_path), heartbeat_s=0.05, stale_s=1.0)
    lock.acquire()
    watch = LockWatch(lock)
    watch.on_train_batch_end(None)  # holding it: nothing happens
    _plant(tmp_path)  # another training takes the run dir over
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunDirLocked, match="was taken over by another training .*stopped"):
        watch.on_train_batch_end(None)
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # the new holder's lease stays


def test_two_trainings_into_one_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", TINY_RECIPE, *FAST_OVERRIDES, "train.total_kimg=0.4",
           f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    subprocess.run([*cmd, "train.total_kimg=0.008"], check=True, cwd=REPO, capture_output=True)  # the dataset exists
    first = subprocess.Popen(
        [*cmd, "--resume", "auto"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (run_dir / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*cmd, "--resume", "auto"], cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"run dir {str(run_dir)!r} is in use by another training (pid {first.pid} on" in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not (run_dir / LOCK_NAME).exists()  # released at the end
