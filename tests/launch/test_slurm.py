"""`ganpipe submit` on a real single-node Slurm cluster: a 2-task CPU job of the tiny recipe (gloo).

a. it runs to completion (the reference);
b. requeued mid-run with `scontrol requeue` (SIGTERM), and separately given the pre-timeout signal (USR1, which
   Slurm sends `--signal=USR1@SECONDS` before the time limit): it checkpoints, restarts (SLURM_RESTART_COUNT=1),
   resumes and finishes the full kimg with the same final G_ema as the uninterrupted job;
c. SIGKILLed while it writes a checkpoint every step, then resubmitted: it resumes and finishes alike.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train import list_checkpoints, load_checkpoint
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE

pytestmark = pytest.mark.slurm

TOTAL_KIMG = 0.4  # 50 steps of 8 images over 2 ranks
RUN = [f"train.total_kimg={TOTAL_KIMG}", "train.checkpoint_every_kimg=0.08", "train.samples_every_kimg=1"]


def _submit(env: dict[str, str], run_dir: Path, cache: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "pipeline.cli", "submit", TINY_RECIPE, "--profile", "local",
           *FAST_OVERRIDES, *RUN, f"run_dir={run_dir}", f"data.cache_dir={cache}", *extra]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    return match.group(1)


def _state(env: dict[str, str], job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def _wait(env: dict[str, str], job: str, until, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        time.sleep(0.5)
    pytest.fail(f"job {job} timed out in state {_state(env, job)!r}")


def _wait_done(env: dict[str, str], job: str) -> None:
    _wait(env, job, lambda: _state(env, job) == "")


def _wait_checkpoint(env: dict[str, str], job: str, run_dir: Path, nimg: int) -> None:
    def reached() -> bool:
        names = [u.rsplit("/", 1)[1] for u in list_checkpoints(str(run_dir))]
        return any(int(n[5:17]) >= nimg for n in names)

    _wait(env, job, reached)


def _node_idle(env: dict[str, str]) -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
    return bool(out) and all(state == "idle" for state in out)


def _restart_now(env: dict[str, str], job: str) -> None:
    """A requeued job waits ~2 minutes (BeginTime) before it may start again; tests do not wait for that. They do
    wait for the node to have finished the job's previous run: started while the node still cleans it up, Slurm
    kills the job ("Job credential revoked"), which is what the BeginTime delay prevents on a real cluster."""
    _wait(env, job, lambda: _state(env, job).startswith("PENDING") and _node_idle(env))
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def _log(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"{run_dir.name}-{job}.out").read_text()


def _final(run_dir: Path) -> dict:
    state = load_checkpoint(list_checkpoints(str(run_dir))[-1])
    assert state["counters"]["cur_nimg"] == round(TOTAL_KIMG * 1000)
    return state


def _assert_same_g_ema(state: dict, reference: dict) -> None:
    for key, value in reference["G_ema"].items():
        torch.testing.assert_close(state["G_ema"][key], value, rtol=0, atol=1e-5, msg=f"G_ema.{key}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slurm-cache")


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict:
    run_dir = tmp_path_factory.mktemp("ref") / "ref"
    job = _submit(slurm_cluster, run_dir, cache)
    _wait_done(slurm_cluster, job)
    log = _log(run_dir, job)
    return {"state": _final(run_dir), "log": log, "run_dir": run_dir}


def test_a_two_task_job_runs_to_completion(reference) -> None:
    log = reference["log"]
    assert "(restart 0)" in log and log.count("run dir:") >= 2  # both ranks finished
    assert "Traceback" not in log
    assert (reference["run_dir"] / "samples" / "reals.png").exists()
    assert reference["state"]["rng"].get("ranks") is not None and len(reference["state"]["rng"]["ranks"]) == 2


@pytest.mark.parametrize("how", ["scontrol-requeue", "pre-timeout-signal"])
def test_b_requeued_job_resumes_exactly(slurm_cluster, reference, tmp_path: Path, cache: Path, how: str) -> None:
    run_dir = tmp_path / how
    job = _submit(slurm_cluster, run_dir, cache)
    _wait_checkpoint(slurm_cluster, job, run_dir, 160)
    if how == "scontrol-requeue":
        subprocess.run(["scontrol", "requeue", job], env=slurm_cluster, check=True)  # SIGTERM to the tasks
    else:
        # What Slurm does SECONDS before the time limit (`--signal=USR1@SECONDS`): USR1 to every task.
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster, check=True)
    _restart_now(slurm_cluster, job)
    _wait_done(slurm_cluster, job)

    log = _log(run_dir, job)
    assert "(restart 1)" in log
    assert ("SIGTERM received" if how == "scontrol-requeue" else "pre-timeout signal received") in log
    if how == "pre-timeout-signal":
        assert f"requeued Slurm job {job}" in log  # the job requeued itself
    assert re.search(r"resuming from .*ckpt-\d+\.pt", log)
    _assert_same_g_ema(_final(run_dir), reference["state"])


def test_c_sigkill_while_checkpointing_then_resubmit(slurm_cluster, reference, tmp_path: Path, cache: Path) -> None:
    run_dir = tmp_path / "killed"
    every_step = ["train.checkpoint_every_kimg=0.008", "train.keep_last=2"]  # a checkpoint write in every step
    job = _submit(slurm_cluster, run_dir, cache, *every_step)
    _wait_checkpoint(slurm_cluster, job, run_dir, 120)
    subprocess.run(["scancel", "--signal=KILL", "--full", job], env=slurm_cluster, check=True)
    _wait_done(slurm_cluster, job)
    for url in list_checkpoints(str(run_dir)):
        load_checkpoint(url)  # every checkpoint under its real name verifies and loads
    job = _submit(slurm_cluster, run_dir, cache, *every_step)  # the same command again: continues the run dir
    _wait_done(slurm_cluster, job)
    assert re.search(r"resuming from .*ckpt-\d+\.pt", _log(run_dir, job))
    _assert_same_g_ema(_final(run_dir), reference["state"])
