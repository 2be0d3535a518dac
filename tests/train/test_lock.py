"""One writer per run dir: the lease refuses a second training (also one of the same job at the same restart), is
taken over from a dead, silent or unreadable holder and taken back by a restarted job, survives races between
processes on a local disk and on an object store, and stops a run that lost it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.lock import LOCK_NAME, RunDirLocked, RunLock
from pipeline.train.preemption import PreemptionCallback, RunDirLost
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

    _plant(tmp_path, host="", pid=0, heartbeat=0.0)
    (tmp_path / LOCK_NAME).write_text("{not json")  # unreadable: silent since it was last modified
    with pytest.raises(RunDirLocked, match=r"in use by another training \(an unreadable lease, last modified 0s"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "taking over the stale lease of an unreadable lease" in caplog.text
    lock.release()

    _plant(tmp_path, job="slurm:77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, restarted elsewhere after a requeue
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "taking back the lease of this job (slurm:77) from its start 0" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.lease.token
    lock.release()


def test_two_trainings_of_one_job_at_the_same_restart_are_two_writers(tmp_path: Path, monkeypatch) -> None:
    # Two `srun` steps of one job, or two runs in one salloc shell: the same job id and restart count.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    _plant(tmp_path, job="slurm:77", restart=2)
    with pytest.raises(RunDirLocked, match=r"\(job slurm:77 \(restart 2\), pid 4242 on elsewhere"):
        RunLock(str(tmp_path)).acquire()
    # torchrun's static rendezvous gives every launch the run id "none": not a job that restarts.
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    _plant(tmp_path, job="torchrun:none")
    with pytest.raises(RunDirLocked, match="in use by another training"):
        RunLock(str(tmp_path)).acquire()


_STARTER = """
import sys, time
from pipeline.train.lock import RunDirLocked, RunLock
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    RunLock(sys.argv[1], settle_s=0.5).acquire()
    print("took it")
except RunDirLocked:
    print("refused")
"""


def _race(url: str, starters: int = 3) -> list[str]:
    """`starters` processes that try to take the lease at the same moment; what each said."""
    start = str(time.time() + 3)  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, url, start], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(starters)]  # fmt: skip
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outcomes.append(out.strip())
    return sorted(outcomes)


def test_processes_racing_for_a_local_lease_one_wins(tmp_path: Path) -> None:
    for attempt in range(3):
        run_dir = tmp_path / f"race{attempt}"
        assert _race(str(run_dir)) == ["refused", "refused", "took it"]
        assert json.loads((run_dir / LOCK_NAME).read_text())["token"]  # whole, never half-written
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]  # no temporary files left behind


def test_processes_racing_on_an_object_store_one_wins(s3_bucket: str) -> None:
    assert _race(f"{s3_bucket}/run") == ["refused", "refused", "took it"]


class _Trainer:
    world_size = 1
    is_global_zero = True


class _Task:
    device = "cpu"


def test_a_run_that_loses_its_lease_stops(tmp_path: Path) -> None:
    lock = RunLock(str(tmp_path), heartbeat_s=0.05, stale_s=1.0)
    lock.acquire()
    saved = []
    stop = PreemptionCallback(lambda *args: saved.append(args), run_dir_lost=lock.lost_reason)
    stop.on_train_batch_end(_Trainer(), _Task())  # holding it: nothing happens
    _plant(tmp_path)  # another training takes the run dir over
    deadline = time.monotonic() + 5
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunDirLost, match="was taken over by another training .*stopped"):
        stop.on_train_batch_end(_Trainer(), _Task())
    assert saved == []  # no checkpoint into a run dir that is another's now
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # the new holder's lease stays


def test_two_trainings_into_one_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", TINY_RECIPE, *FAST_OVERRIDES, f"run_dir={run_dir}",
           f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    subprocess.run([*cmd, "train.total_kimg=0.008"], check=True, cwd=REPO, capture_output=True)  # the dataset exists
    first = subprocess.Popen(  # long enough to still run when the second starts; stopped below
        [*cmd, "train.total_kimg=50", "--resume", "auto"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (run_dir / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*cmd, "train.total_kimg=50", "--resume", "auto"], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"run dir {str(run_dir)!r} is in use by another training (pid {first.pid} on" in second.stderr
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-3000:]
    assert not (run_dir / LOCK_NAME).exists()  # released when it stopped
