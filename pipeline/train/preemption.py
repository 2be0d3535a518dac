"""Stopping early without losing work: Ctrl-C, SIGTERM and Slurm's pre-timeout signal all checkpoint at the next
step boundary and stop; the pre-timeout signal also requeues the Slurm job.

Contract
    * The handlers only record which signal arrived: SIGINT (Ctrl-C), SIGTERM (what Slurm sends on preemption,
      `scontrol requeue` and `scancel`, and what `kill` sends) and `requeue_signal` (Slurm's pre-timeout signal from
      `#SBATCH --signal=USR1@SECONDS`). Nothing else happens inside a handler: saving there could deadlock in a
      collective that another rank never enters (Lightning's own SLURM auto-requeue does that; it is switched off).
      A second Ctrl-C exits at once (status 130): checkpoints are written to a temporary name and renamed, so the
      newest checkpoint under its real name stays whole.
    * Long work between step boundaries polls `requested()` and gives up early: an evaluation is abandoned (and
      not recorded), a sample grid is skipped. So a stop is acted on within seconds wherever the run is.
    * At every step boundary all ranks agree (one all-reduce MAX of the request, so a signal seen by any rank
      counts for all, at the same step). When set: every rank takes part in the checkpoint (rank 0 writes it), the
      task is marked `preempted`, and the trainer stops after this step.
    * The same all-reduce carries whether rank 0 lost its lease on the run dir (`pipeline.train.lock`): then every
      rank raises `RunDirLost` at that step, writing nothing more, so no rank waits in a collective of a rank that
      left.
    * Lightning composes its own SIGTERM handler with ours while it sets up (its flag would stop the loop mid-step
      and exit 0); `on_train_start` takes a SIGTERM it recorded over as ours and puts our handlers back alone.
    * After training has stopped, `requeue_if_requested` (called by `train()`) runs `scontrol requeue
      $SLURM_JOB_ID` on rank 0 when the requeue signal was received inside a Slurm job, so the job goes back to
      the queue and, restarted, resumes with `--resume auto`. SIGTERM does not requeue: Slurm requeues preempted
      and `scontrol requeue`d jobs itself, and `scancel` means stop.
    * `exit_code` is what `ganpipe train` exits with: 0 when training completed or the job requeued itself,
      128 + the signal's number when a signal stopped it early, or arrived during the final evaluation (130
      Ctrl-C, 143 SIGTERM, 138 the pre-timeout signal outside Slurm or when `scontrol requeue` failed), so wrappers
      can tell "stopped early" from "done".
    * A time limit reached without any signal loses the work since the last periodic checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from pipeline.errors import GanpipeError

log = logging.getLogger(__name__)

# Stop requests, by strength (ranks agree on the strongest any of them saw).
_INTERRUPT = 1  # SIGINT: checkpoint and stop
_TERMINATE = 2  # SIGTERM: checkpoint and stop
_REQUEUE = 3  # the pre-timeout signal: checkpoint, requeue, stop


class RunDirLost(GanpipeError, RuntimeError):
    """Another training took the run dir over (rank 0's lease was taken): every rank stopped without writing."""


def signal_from_name(name: str) -> signal.Signals:
    """`USR1`, `SIGUSR1` or `usr1` -> signal.SIGUSR1."""
    return signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"]


class PreemptionCallback(L.Callback):
    """Turns Ctrl-C, SIGTERM and the pre-timeout signal into a checkpoint at the next step boundary and a clean stop.

    `save` is the checkpoint callback's save function (called on every rank; it must contain the collectives of
    the checkpoint and write only on rank 0). Place this callback after the periodic checkpoint callback, so a
    checkpoint that was due at this step is not written twice. `install()` before `trainer.fit` (Lightning keeps
    the handlers it finds and restores them after fit) and `uninstall()` when training is over. `run_dir_lost`
    (rank 0's lease watch) returns a one-line reason once another training took the run dir over, else None.
    """

    def __init__(
        self, save: Any, requeue_signal: str | None = "USR1", run_dir_lost: Callable[[], str | None] | None = None
    ) -> None:
        self.save = save
        self.requeue_signal = signal_from_name(requeue_signal) if requeue_signal else None
        self.run_dir_lost = run_dir_lost
        self.received = 0  # the strongest request seen by this process
        self.decision = 0  # what all ranks agreed on
        self._previous: dict[signal.Signals, Any] = {}

    # Signal handling ---------------------------------------------------------------------------------------------

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: everything else happens at the next step boundary (or, for a second Ctrl-C, right now).
        if signum == signal.SIGINT:
            if self.received:
                os.write(2, b"\nganpipe: second Ctrl-C: exiting now; the newest checkpoint is whole\n")
                os._exit(128 + signal.SIGINT)
            os.write(2, b"\nganpipe: Ctrl-C: checkpointing at the next step, then stopping (Ctrl-C again: now)\n")
            request = _INTERRUPT
        else:
            request = _REQUEUE if signum == self.requeue_signal else _TERMINATE
        self.received = max(self.received, request)

    def requested(self) -> bool:
        """Whether this process was asked to stop: long work between steps polls it to give up early."""
        return self.received > 0

    def _signums(self) -> list[signal.Signals]:
        return [signal.SIGINT, signal.SIGTERM] + ([self.requeue_signal] if self.requeue_signal is not None else [])

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: stop signals are not handled")
            return
        for signum in self._signums():
            previous = signal.signal(signum, self._handler)
            self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # Lightning hooks ------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning composed its own SIGTERM handler with ours while setting up. A SIGTERM it recorded becomes ours
        # (its flag would end the loop without our checkpoint and exit 0), and ours handles signals alone again.
        connector = trainer._signal_connector
        if connector.received_sigterm:
            self.received = max(self.received, _TERMINATE)
            connector.received_sigterm = False
        self.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        reason = self.run_dir_lost() if self.run_dir_lost is not None else None
        flag = torch.tensor([self.received, reason is not None], dtype=torch.int32, device=pl_module.device)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        decision, lost = (int(v) for v in flag.tolist())
        if lost:  # another training writes into the run dir now: every rank stops here, writing nothing more
            raise RunDirLost(reason or "another training took the run dir over (rank 0 lost its lease): stopped")
        if decision == 0:
            return
        self.decision = decision
        if trainer.is_global_zero:
            log.info(
                "%s received: checkpointing at %.3f kimg and stopping", self.signal_name, pl_module.cur_nimg / 1000
            )
        pl_module.preempted = True
        self.save(trainer, pl_module)
        trainer.should_stop = True

    @property
    def _request(self) -> int:
        # What the ranks agreed on at a step boundary; else a signal that came after the last one (during the
        # final evaluation), which ended no step but still cut the run's work short.
        return self.decision or self.received

    @property
    def signal_name(self) -> str | None:
        """The signal that stopped training early, in words; None when none did."""
        if not self._request:
            return None
        if self._request == _REQUEUE and self.requeue_signal is not None:
            return "pre-timeout signal"
        return {_INTERRUPT: "Ctrl-C (SIGINT)", _TERMINATE: "SIGTERM"}[self._request]

    @property
    def requeue_requested(self) -> bool:
        return self.decision == _REQUEUE

    def exit_code(self, requeued: bool = False) -> int:
        """0 when no signal cut the run short, or when the pre-timeout signal stopped a Slurm job that `requeued`
        itself (every task leaves cleanly); else 128 + the signal's number."""
        if not self._request:
            return 0
        if self._request == _REQUEUE and self.requeue_signal is not None:
            return 0 if requeued else 128 + int(self.requeue_signal)
        return 128 + int(signal.SIGINT if self._request == _INTERRUPT else signal.SIGTERM)


def slurm_job_id() -> str | None:
    """The id to requeue: `ARRAYJOB_TASK` for an array task, else SLURM_JOB_ID; None outside Slurm."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    return job_id if job_id and re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id) else None


def requeue_slurm_job(job_id: str) -> bool:
    """`scontrol requeue JOB_ID`; True when Slurm accepted it. Failures are logged, never raised: the checkpoint
    is already safe, and the job can be resubmitted by hand (`ganpipe submit ...` continues the run dir)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("scontrol not found: job %s is not requeued; resubmit it to continue", job_id)
        return False
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%s): resubmit to continue", job_id, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s: it resumes from the checkpoint when it restarts", job_id)
    return True


def requeue_if_requested(callback: PreemptionCallback | None, is_global_zero: bool) -> bool:
    """After training stopped: requeue this Slurm job (rank 0 only) if the pre-timeout signal asked for it."""
    if callback is None or not callback.requeue_requested or not is_global_zero:
        return False
    job_id = slurm_job_id()
    if job_id is None:
        log.info("pre-timeout signal outside a Slurm job: stopped with a checkpoint; continue with --resume auto")
        return False
    return requeue_slurm_job(job_id)
