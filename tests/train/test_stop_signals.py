"""Signals sent to a real `ganpipe train` process: Ctrl-C and SIGTERM checkpoint at the next step and exit with
128 + the signal's number; a second Ctrl-C exits at once with every checkpoint whole; a stop during an evaluation
abandons it and checkpoints within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import list_checkpoints, load_checkpoint
from pipeline.train import train
from pipeline.train.preemption import PreemptionCallback, requeue_if_requested
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE


class Run:
    """`ganpipe train` in a subprocess, its output in files."""

    def __init__(self, tmp_path: Path, *overrides: str, program: tuple[str, ...] = ("-m", "pipeline.cli")) -> None:
        self.run_dir = tmp_path / "run"
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        cmd = [sys.executable, *program, "train", TINY_RECIPE, *FAST_OVERRIDES, "train.total_kimg=50",
               f"run_dir={self.run_dir}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)

    def wait_for(self, what, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out; stderr:\n{self.err.read_text()[-3000:]}"
            time.sleep(0.1)

    def checkpoints(self) -> list[str]:
        return list_checkpoints(str(self.run_dir))

    def stop(self, signum: int, timeout: float = 60) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0


@pytest.mark.parametrize(("signum", "code", "words"), [(signal.SIGINT, 130, "Ctrl-C (SIGINT)"),
                                                        (signal.SIGTERM, 143, "SIGTERM")])  # fmt: skip
def test_a_signal_checkpoints_at_the_next_step_and_exits_128_plus_its_number(tmp_path, signum, code, words) -> None:
    run = Run(tmp_path, "train.checkpoint_every_kimg=0.08")
    run.wait_for(lambda: len(run.checkpoints()) >= 1)
    exit_code, _ = run.stop(signum)
    err = run.err.read_text()
    assert exit_code == code, err[-3000:]
    assert "Traceback" not in err and f"stopped early by {words}" in err
    newest = load_checkpoint(run.checkpoints()[-1])
    assert f"({newest['counters']['cur_nimg'] / 1000:.3f} kimg, last checkpoint: {run.checkpoints()[-1]})" in (
        run.out.read_text()
    )  # the line names the checkpoint the stop wrote


def test_a_second_ctrl_c_exits_at_once_and_every_checkpoint_is_whole(tmp_path) -> None:
    # Steps long enough that the second Ctrl-C lands before the first stop completes; a checkpoint every step.
    run = Run(tmp_path, "data.batch_size=256", "data.synth.n=256", "train.checkpoint_every_kimg=0.256")
    run.wait_for(lambda: len(run.checkpoints()) >= 2)
    run.proc.send_signal(signal.SIGINT)
    run.wait_for(lambda: "Ctrl-C: checkpointing at the next step" in run.err.read_text())  # two at once merge into one
    exit_code, seconds = run.stop(signal.SIGINT, timeout=10)
    assert exit_code == 130 and seconds < 5, run.err.read_text()[-3000:]
    assert "second Ctrl-C: exiting now" in run.err.read_text()
    assert "stopped early" not in run.err.read_text()  # it did not wait for the step boundary
    for url in run.checkpoints():
        load_checkpoint(url)  # every checkpoint under its real name verifies against its record


def test_a_stop_during_an_evaluation_checkpoints_within_seconds(tmp_path) -> None:
    # The small extractor on 20000 generated images: about a minute on this CPU, much longer than the stop may take.
    run = Run(tmp_path, "eval.metrics=[fid20k_full]", "eval.extractor=small", "eval.every_kimg=0.016",
              "train.checkpoint_every_kimg=10")  # fmt: skip
    run.wait_for(lambda: "evaluating fid20k_full at 0.0" in run.err.read_text())
    time.sleep(1)
    exit_code, seconds = run.stop(signal.SIGTERM, timeout=60)
    err = run.err.read_text()
    assert exit_code == 143 and seconds < 10, (seconds, err[-3000:])
    assert "evaluation at 0.0 kimg abandoned" in err
    (ckpt,) = run.checkpoints()
    assert load_checkpoint(ckpt)["counters"]["cur_nimg"] == 16
    assert not (run.run_dir / "metrics.jsonl").exists()  # the abandoned evaluation is not recorded


_SLOW_SETUP = """
import sys, time
from pipeline.cli import main
from pipeline.train.run import ShardDataModule
original = ShardDataModule.train_dataloader
def slow(self):
    print("setting up the data", file=sys.stderr, flush=True)
    time.sleep(3)  # e.g. listing a remote dataset: Lightning's own SIGTERM handler is in front of ours now
    return original(self)
ShardDataModule.train_dataloader = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_lightning_sets_up_checkpoints_at_the_first_step(tmp_path) -> None:
    run = Run(tmp_path, program=("-c", _SLOW_SETUP))
    run.wait_for(lambda: "setting up the data" in run.err.read_text())
    exit_code, _ = run.stop(signal.SIGTERM)
    err = run.err.read_text()
    assert exit_code == 143 and "stopped early by SIGTERM" in err, err[-3000:]
    (ckpt,) = run.checkpoints()
    assert load_checkpoint(ckpt)["counters"]["cur_nimg"] == 8  # one step, then the checkpoint


class _Trainer:
    world_size, is_global_zero, should_stop = 1, True, False


class _Task:
    device, cur_nimg, preempted = "cpu", 8, False


@pytest.mark.parametrize(("signum", "requeued", "code"), [(signal.SIGUSR1, True, 0), (signal.SIGUSR1, False, 138),
                                                          (signal.SIGTERM, False, 143)])  # fmt: skip
def test_exit_codes(signum, requeued, code) -> None:
    saved = []
    stop = PreemptionCallback(lambda *args: saved.append(args), requeue_signal="USR1")
    stop._handler(signum, None)
    trainer, task = _Trainer(), _Task()
    stop.on_train_batch_end(trainer, task)
    assert saved and trainer.should_stop and task.preempted
    assert stop.exit_code(requeued) == code  # the pre-timeout signal exits 0 only when the job really requeued


def test_a_failed_requeue_is_reported_not_raised(tmp_path, monkeypatch, caplog) -> None:
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    stop = PreemptionCallback(lambda *args: None, requeue_signal="USR1")
    stop._handler(signal.SIGUSR1, None)
    stop.on_train_batch_end(_Trainer(), _Task())
    assert requeue_if_requested(stop, is_global_zero=True) is False
    assert "scontrol requeue 77 failed (Invalid job id specified)" in caplog.text


def test_train_leaves_no_signal_handlers_behind(make_config) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    cfg = make_config("train.total_kimg=0.4", "train.checkpoint_every_kimg=0.008")

    def terminate_after_the_first_checkpoint() -> None:
        while not list_checkpoints(cfg.run_dir):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    first = threading.Thread(target=terminate_after_the_first_checkpoint, daemon=True)
    first.start()
    result = train(cfg)
    assert result.exit_code == 143 and result.preempted
    assert {s: signal.getsignal(s) for s in before} == before
