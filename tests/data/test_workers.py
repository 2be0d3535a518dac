"""The loader's worker processes: batch order, errors and deaths reaching the trainer, and workers that never
outlive their pass or their trainer."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data import DatasetError, StreamDataset, StreamLoader, open_source
from pipeline.data import stream as stream_module
from pipeline.data.workers import PREFETCH, StreamPass
from pipeline.errors import WorkerError


def _dataset(shards: str, **kw: Any) -> StreamDataset:
    args: dict[str, Any] = dict(seed=1, batch_size=2, resolution=16, num_workers=2)
    args.update(kw)
    return StreamDataset(open_source(shards), **args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; it only waits to be reaped
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_batches_come_round_robin_from_the_rotated_workers(shards: str) -> None:
    """Batch i comes from worker i mod K, which serves slot rank*K + (i + rotation) mod K: the order that
    exact resume relies on."""
    ds = _dataset(shards, num_workers=3, rank=1, world_size=2, rotation=1, num_batches=10)
    slots = [b["stream"].slot for b in StreamLoader(ds, pin_memory=False)]
    assert slots == [ds.slot_of_worker(i % 3) for i in range(10)] and slots[:3] == [4, 5, 3]


def test_workers_that_end_early_leave_the_rotation(shards: str) -> None:
    """`once` with 6 shards over 4 workers: two workers read two shards, two read one; the pass goes on
    with the remaining workers in order and delivers every sample once."""
    ds = _dataset(shards, num_workers=4, batch_size=5, mode="once")
    batches = [b for b in StreamLoader(ds, pin_memory=False) if "key" in b]
    slots = [b["stream"].slot for b in batches]
    assert slots == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1]
    assert sorted(int(k) for b in batches for k in b["key"]) == list(range(60))


def test_forkserver_workers_stream_what_fork_workers_do(shards: str) -> None:
    """Workers started without fork (Python 3.14's default is forkserver) get the dataset pickled, and
    stream the same batches."""

    def keys_and_images(start_method: str) -> list[tuple[list[str], bytes]]:
        loader = StreamLoader(_dataset(shards, num_batches=8), pin_memory=False, start_method=start_method)
        return [(b["key"], b["image"].numpy().tobytes()) for b in loader]

    assert keys_and_images("forkserver") == keys_and_images("fork")


def test_a_worker_exception_reaches_the_trainer_with_its_traceback(
    shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise ZeroDivisionError("the worker's own bug")

    monkeypatch.setattr(stream_module, "_put_image", broken)  # fork: the workers inherit the patch
    with pytest.raises(RuntimeError, match=r"(?s)worker \d failed:.*ZeroDivisionError: the worker's own bug"):
        list(StreamLoader(_dataset(shards, num_batches=4), pin_memory=False, start_method="fork"))


def test_a_worker_dataset_error_stays_one_line(tmp_path: Any) -> None:
    from pipeline.data import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "a"), n=4, resolution=16, seed=0, samples_per_shard=4)
    write_synthetic_dataset(str(tmp_path / "b"), n=4, resolution=8, seed=0, samples_per_shard=4)
    url = f"{tmp_path}/a/shard-000000.tar::{tmp_path}/b/shard-000000.tar"
    ds = StreamDataset(open_source(url), seed=0, batch_size=8, resolution=None, mode="once", num_workers=1)
    with pytest.raises(DatasetError, match=r"^sample '\d+' is 8x8: batching needs data.resolution$"):
        list(StreamLoader(ds, pin_memory=False))


def test_a_killed_worker_is_a_one_line_worker_error(shards: str) -> None:
    it = StreamPass(_dataset(shards), pin_memory=False)
    next(it)
    victim = it.worker_pids[1]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(WorkerError, match=rf"^data loader worker 1 \(pid {victim}\) was killed by SIGKILL"):
        for _ in range(PREFETCH + 2):  # what it sent before it died still arrives
            next(it)
    assert _wait_gone(it.worker_pids, 10) == []  # the pass stopped its other worker


def test_workers_leave_job_control_signals_to_the_trainer(shards: str) -> None:
    """Slurm signals every process of the step (SIGTERM on preemption, USR1 before the time limit) and Ctrl-C
    reaches the whole process group: workers neither die of these nor run the trainer's handlers (inherited by
    fork), and keep streaming until the trainer stops them."""

    def trainer_handler(*_: Any) -> None:
        os._exit(3)  # in a worker, this would end it with code 3

    previous = signal.signal(signal.SIGTERM, trainer_handler)
    try:
        it = StreamPass(_dataset(shards), pin_memory=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for _ in range(2):  # right after the start (signals that arrive before a worker runs count too), and later
        for pid in it.worker_pids:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
                os.kill(pid, sig)
        next(it)
    for _ in range(3 * PREFETCH):
        assert next(it)["image"].shape == (2, 3, 16, 16)
    assert all(w.process.is_alive() for w in it.workers)
    it.close()
    assert [w.process.exitcode for w in it.workers] == [-signal.SIGKILL] * 2


def test_closing_or_dropping_a_pass_stops_its_workers(shards: str) -> None:
    first = StreamPass(_dataset(shards), pin_memory=False)
    batch = next(first)
    pids = first.worker_pids
    first.close()
    assert _wait_gone(pids, 10) == []
    assert batch["image"].shape == (2, 3, 16, 16)  # batches handed out stay valid
    it = iter(StreamLoader(_dataset(shards), pin_memory=False))
    next(it)
    pids = it.worker_pids  # type: ignore[attr-defined]
    del it
    gc.collect()
    assert _wait_gone(pids, 10) == []


@pytest.mark.parametrize("pin", [False, True])
def test_a_pass_that_ended_failed_or_closed_stays_ended(
    shards: str, pin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its end, its failure or `close()`, a pass raises StopIteration: it neither waits for a pin thread
    that is gone nor reports its own stopped workers as deaths."""
    if pin and not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    ended = StreamPass(_dataset(shards, num_batches=3), pin_memory=pin)
    assert len(list(ended)) == 3
    closed = StreamPass(_dataset(shards), pin_memory=pin)
    next(closed)
    closed.close()
    failed = StreamPass(_dataset(shards), pin_memory=pin)
    os.kill(failed.worker_pids[0], signal.SIGKILL)
    with pytest.raises(WorkerError):
        for _ in range(PREFETCH + 2):  # what it sent before it died still arrives
            next(failed)
    for it in (ended, closed, failed):
        with pytest.raises(StopIteration):
            next(it)


def test_workers_exit_when_their_trainer_dies(shards: str) -> None:
    """A trainer killed outright (no cleanup) leaves no workers behind: they notice within seconds."""
    script = textwrap.dedent(f"""
        import os
        from pipeline.data import StreamDataset, open_source
        from pipeline.data.workers import StreamPass
        ds = StreamDataset(open_source({shards!r}), seed=1, batch_size=2, resolution=16, num_workers=2)
        it = StreamPass(ds, pin_memory=False)
        next(it)
        print(*it.worker_pids, flush=True)
        os._exit(0)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and _wait_gone(pids, 20) == []


def test_labels_are_tensors_in_every_mode(shards: str) -> None:
    for workers in (0, 2):
        batch = next(iter(StreamLoader(_dataset(shards, num_workers=workers), pin_memory=False)))
        assert isinstance(batch["label"], torch.Tensor) and batch["label"].dtype == torch.int64
