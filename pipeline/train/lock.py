"""One writer per run dir: `ganpipe train` holds a lease on it (`RUN_DIR/ganpipe.lock`, JSON) from before it writes
anything until it stops, and keeps the lease alive with a heartbeat.

Contract
    * The lease names its holder: the Slurm job id (or torchrun's run id) when there is one, the host, the pid, a
      random token, when it was taken and its last heartbeat (UNIX seconds). The holder rewrites it every
      `heartbeat_s` from a daemon thread.
    * `acquire()`, by global rank 0 only (the other ranks write nothing):
        - no lease: take it;
        - a lease of the same Slurm job (a requeued job restarts on another host or pid): take it back;
        - a lease whose holder is gone (this host, and its pid no longer runs) or silent (no heartbeat for
          `stale_s`): take it over, and say whose it was;
        - else refuse with `RunDirLocked`: one line naming the holder and what to do.
      Taking is race-safe. A new lease on a local file system is created with O_EXCL, so of two starters one wins.
      Elsewhere (object stores, shared file systems through fsspec), and when taking over, the lease is published
      and read back after `settle_s`; a starter that finds another's token there lost the race and refuses.
    * A heartbeat that finds the lease in another's hands sets `lost`; `LockWatch` then stops training at the next
      step with a one-line error, so two writers never continue side by side. `release()` stops the heartbeat and
      deletes the lease if it is still ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import lightning as L
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import GanpipeError
from pipeline.storage import publish_atomic

log = logging.getLogger(__name__)

LOCK_NAME = "ganpipe.lock"


class RunDirLocked(GanpipeError, RuntimeError):
    """Another training holds the run dir, or took it over from this one."""


def current_job_id() -> str | None:
    """The scheduler's id of this job, the same for every restart of it: Slurm's, or torchrun's run id."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"slurm:{array_job}_{array_task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    return None


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    job: str | None
    taken: float
    heartbeat: float

    def describe(self) -> str:
        job = f"job {self.job}, " if self.job else ""
        return f"{job}pid {self.pid} on {self.host}, last heartbeat {time.time() - self.heartbeat:.0f}s ago"

    def gone(self) -> bool:
        """Its holder ran on this host and no longer does."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a process of another user has that pid
            return False
        return False


def _pid_is_ours(lease: Lease) -> bool:
    return lease.host == socket.gethostname() and lease.pid == os.getpid()


class RunLock:
    """The lease on one run dir (see the module docstring)."""

    def __init__(self, run_dir: str, heartbeat_s: float = 30.0, stale_s: float = 300.0, settle_s: float = 1.0) -> None:
        if stale_s <= 2 * heartbeat_s:
            raise ValueError("stale_s must allow for a few missed heartbeats")
        self.run_dir, self.url = run_dir, f"{run_dir.rstrip('/')}/{LOCK_NAME}"
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.lease: Lease | None = None
        self.lost: Lease | None = None  # who took the lease from us, as the heartbeat found
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Reading and writing the lease --------------------------------------------------------------------------

    def read(self) -> Lease | None:
        self.fs.invalidate_cache(self.fs._parent(self.path))
        try:
            data = json.loads(self.fs.cat_file(self.path))
            return Lease(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # a lease cut short by a crash mid-write (only without atomic rename)
            return None

    def _write(self, lease: Lease) -> None:
        publish_atomic(self.path, json.dumps(asdict(lease)).encode(), fs=self.fs)

    def _create_exclusive(self, lease: Lease) -> bool:
        """Create the lease if there is none, atomically where the file system allows; False if one exists."""
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(asdict(lease)))
                fh.flush()
                os.fsync(fh.fileno())
            return True
        if self.fs.exists(self.path):
            return False
        self._write(lease)
        return self._still_ours(lease)

    def _still_ours(self, lease: Lease) -> bool:
        time.sleep(self.settle_s)  # a concurrent starter's write lands within this; the last writer wins
        found = self.read()
        return found is not None and found.token == lease.token

    # The protocol ---------------------------------------------------------------------------------------------

    def acquire(self) -> None:
        now = time.time()
        mine = Lease(secrets.token_hex(8), socket.gethostname(), os.getpid(), current_job_id(), now, now)
        if self._create_exclusive(mine):
            return self._hold(mine)
        held = self.read()
        if held is None:  # it vanished (released) or is unreadable: one more try
            if self._create_exclusive(mine):
                return self._hold(mine)
            held = self.read()
        if held is not None and not self._may_take(held):
            raise RunDirLocked(
                f"run dir {self.run_dir!r} is in use by another training ({held.describe()}): wait for it to end, "
                f"stop it, or choose another run_dir=...; a lease silent for {self.stale_s:.0f}s is taken over"
            )
        self._write(mine)
        if not self._still_ours(mine):
            winner = self.read()
            raise RunDirLocked(
                f"run dir {self.run_dir!r} was taken by another training starting at the same time"
                f"{f' ({winner.describe()})' if winner else ''}: choose another run_dir=..."
            )
        self._hold(mine)

    def _may_take(self, held: Lease) -> bool:
        if held.job is not None and held.job == current_job_id():
            log.info("run dir lock: taking back the lease of this job (%s) from its earlier run", held.job)
            return True
        if _pid_is_ours(held):
            return True
        if held.gone():
            log.warning("run dir lock: taking over from %s, which no longer runs", held.describe())
            return True
        if time.time() - held.heartbeat > self.stale_s:
            log.warning("run dir lock: taking over the stale lease of %s", held.describe())
            return True
        return False

    def _hold(self, lease: Lease) -> None:
        self.lease = lease
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="ganpipe-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            assert self.lease is not None
            found = self.read()
            if found is not None and found.token != self.lease.token:
                self.lost = found
                log.error("run dir lock: %s took the run dir over from this training", found.describe())
                return
            self.lease = Lease(**{**asdict(self.lease), "heartbeat": time.time()})
            with contextlib.suppress(Exception):  # a failed beat is retried at the next one
                self._write(self.lease)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s)
        if self.lease is not None and self.lost is None:
            found = self.read()
            if found is not None and found.token == self.lease.token:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path)
        self.lease = None


class LockWatch(L.Callback):
    """Stops training at the next step when the run dir lock was taken over (see the module docstring)."""

    def __init__(self, lock: RunLock) -> None:
        self.lock = lock

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.lock.lost is not None:
            raise RunDirLocked(
                f"run dir {self.lock.run_dir!r} was taken over by another training ({self.lock.lost.describe()}): "
                "stopped, so the two do not write over each other"
            )


__all__ = ["LOCK_NAME", "Lease", "LockWatch", "RunDirLocked", "RunLock", "current_job_id"]
