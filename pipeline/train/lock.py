"""One writer per run dir: `ganpipe train` holds a lease on it (`RUN_DIR/ganpipe.lock`, JSON) from before it writes
anything until it stops, and keeps the lease alive with a heartbeat.

Contract
    * The lease names its holder: the Slurm job id (or torchrun's run id) and how often that job was restarted,
      the host, the pid, a random token, when it was taken and its last heartbeat (UNIX seconds). The holder
      rewrites it every `heartbeat_s` from a daemon thread; a failed heartbeat is logged once per failure streak.
    * `acquire()`, by global rank 0 only (the other ranks write nothing):
        - no lease: take it;
        - a lease of an earlier start of this job (the same job with a lower restart count: Slurm's
          SLURM_RESTART_COUNT, torchrun's TORCHELASTIC_RESTART_COUNT): take it back. Two trainings of one job
          at the same count (two `srun` steps, two runs in one `salloc` shell, torchrun's static run id "none")
          are different writers: the later one is refused;
        - a lease whose holder is gone (this host, and its pid no longer runs) or silent (no heartbeat for
          `stale_s`; an unreadable lease counts as silent since it was last modified): take it over, and say whose;
        - else refuse with `RunDirLocked`: one line naming the holder and what to do.
      Taking is race-safe. On a local file system a new lease is written whole under a temporary name and then
      hard-linked to its name, which fails when a lease exists, so of two starters one wins and no starter ever
      reads a half-written lease. Elsewhere (object stores, shared file systems through fsspec), and when taking
      over, the lease is published and read back after `settle_s`; a starter that finds another's token there lost
      the race and refuses.
    * A heartbeat that finds the lease in another's hands records it; `lost_reason()` then says so in one line, and
      the preemption callback stops every rank at the next step (`RunDirLost`), so two writers never continue side
      by side. `release()` stops the heartbeat and deletes the lease if it is still ours.
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

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import GanpipeError
from pipeline.storage import publish_atomic
from pipeline.train.preemption import slurm_job_id

log = logging.getLogger(__name__)

LOCK_NAME = "ganpipe.lock"


class RunDirLocked(GanpipeError, RuntimeError):
    """Another training holds the run dir, or took it over from this one."""


def _count(name: str) -> int:
    value = os.environ.get(name, "0")
    return int(value) if value.isdigit() else 0


def current_job() -> tuple[str | None, int]:
    """(the scheduler's id of this job, the same for every restart of it; how often it was restarted): Slurm's job
    (or array task), or torchrun's run id; (None, 0) outside both, and for torchrun's static run id "none"."""
    slurm = slurm_job_id()
    if slurm is not None:
        return f"slurm:{slurm}", _count("SLURM_RESTART_COUNT")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}", _count("TORCHELASTIC_RESTART_COUNT")
    return None, 0


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    job: str | None
    taken: float
    heartbeat: float
    restart: int = 0  # the job's restart count when it took the lease

    def describe(self) -> str:
        if not self.token:
            return f"an unreadable lease, last modified {time.time() - self.heartbeat:.0f}s ago"
        job = f"job {self.job}{f' (restart {self.restart})' if self.restart else ''}, " if self.job else ""
        return f"{job}pid {self.pid} on {self.host}, last heartbeat {time.time() - self.heartbeat:.0f}s ago"

    def gone(self) -> bool:
        """Its holder ran on this host and no longer does."""
        if not self.token or self.host != socket.gethostname():
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
        """The lease, None when there is none. One that cannot be parsed (someone else's file, or a write cut
        short on a store without atomic rename) is a lease without a holder, silent since it was last modified."""
        self.fs.invalidate_cache(self.fs._parent(self.path))
        try:
            data = json.loads(self.fs.cat_file(self.path))
            return Lease(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            try:
                modified = self.fs.modified(self.path).timestamp()
            except FileNotFoundError:
                return None
            except (NotImplementedError, OSError, ValueError):
                modified = time.time()
            return Lease("", "", 0, None, modified, modified)

    def _write(self, lease: Lease) -> None:
        publish_atomic(self.path, json.dumps(asdict(lease)).encode(), fs=self.fs)

    def _create_exclusive(self, lease: Lease) -> bool:
        """Create the lease if there is none, atomically where the file system allows; False if one exists."""
        if isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp-{lease.token}"
            with open(tmp, "w") as fh:  # whole before it has the lease's name: nobody reads half of it
                fh.write(json.dumps(asdict(lease)))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)  # fails if a lease exists, atomically
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
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
        job, restart = current_job()
        mine = Lease(secrets.token_hex(8), socket.gethostname(), os.getpid(), job, now, now, restart)
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
        job, restart = current_job()
        if held.job is not None and held.job == job and held.restart < restart:
            log.info("run dir lock: taking back the lease of this job (%s) from its start %d", job, held.restart)
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
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            assert self.lease is not None
            try:
                found = self.read()
                if found is not None and found.token != self.lease.token:
                    self.lost = found
                    log.error("run dir lock: %s took the run dir over from this training", found.describe())
                    return
                self.lease = Lease(**{**asdict(self.lease), "heartbeat": time.time()})
                self._write(self.lease)
            except Exception as e:  # retried at the next beat; said once, as a lease silent for stale_s is taken
                if not failing:
                    log.warning("run dir lock: heartbeat failed (%s: %s); retrying every %.0fs, and after %.0fs "
                                "without one another training may take the run dir", type(e).__name__, e,
                                self.heartbeat_s, self.stale_s)  # fmt: skip
                failing = True
            else:
                if failing:
                    log.info("run dir lock: heartbeat restored")
                failing = False

    def lost_reason(self) -> str | None:
        """One line once another training took the run dir over from this one, else None."""
        if self.lost is None:
            return None
        return (
            f"run dir {self.run_dir!r} was taken over by another training ({self.lost.describe()}): stopped, so the "
            "two do not write over each other"
        )

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


__all__ = ["LOCK_NAME", "Lease", "RunDirLocked", "RunLock", "current_job"]
