"""The streaming loader's worker processes: K processes, one per slot, each sending its batches down a pipe.

Contract
    `StreamLoader(dataset)` yields batch i of a pass from worker i mod K while all workers run; a worker whose
    stream ended (in `once` mode, or when K does not divide `num_batches`) leaves the rotation and the next
    one takes its turn. Exact resume depends on this order (see `pipeline.data.stream`). A worker's
    `DatasetError` is re-raised in the trainer as the same one line; any other exception with the worker's
    traceback; a worker that dies as a `WorkerError` naming its exit code or signal. Every pass starts its own
    workers and stops them when the pass ends, fails, or is dropped. Workers leave job-control signals
    (Ctrl-C, Slurm's SIGTERM and pre-timeout signal) to the trainer, and exit by themselves when it is gone.

Why not torch's DataLoader
    It asks a worker for every batch by sending an index through a queue with a feeder thread, and answers
    through another; its trainer side costs 150 us per batch on an idle core and 300-450 us on a busy one,
    which on a 2-core machine is a tenth of what the workers decode. Here a worker runs ahead on its own, at
    most `PREFETCH` batches beyond what the trainer has received (a semaphore per worker, released by the
    trainer on receipt), and each batch is one pipe message of a few KiB: the images stay in shared memory.

Batch buffers
    Each worker recycles `POOL_SLOTS` shared-memory batch buffers. A fresh buffer per batch would cost a page
    fault per 4 KiB page in the worker, and an fd hand-over (a socket round trip through a helper thread) and
    an mmap in the trainer. A buffer crosses to the trainer with its first batch only; later batches in it
    travel as (slot, count). The `PoolBoard` has a shared byte per slot: the worker sets it when a batch
    leaves in that slot's buffer, and the trainer clears it when the last tensor on the batch is freed (with
    pinned memory, right after the copy). A worker never overwrites a batch that is still held: when all its
    slots are busy it sends a fresh buffer instead, so a trainer that keeps batches never stalls it.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Semaphore
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.multiprocessing  # registers torch's shared-memory pickling of tensors for pipes

from pipeline.errors import DatasetError, WorkerError

if TYPE_CHECKING:
    from pipeline.data.stream import StreamDataset

POOL_SLOTS = 8  # batch buffers per worker: PREFETCH in flight + the trainer's current and next + spares
PREFETCH = 4  # batches a worker may have sent beyond what the trainer received
_PARENT_CHECK_S = 5.0  # how often a waiting worker checks that its trainer still exists


class PooledImages(NamedTuple):
    """A batch's images as they cross to the trainer: slot `index` of the board, the first `count` images of
    that slot's buffer, and the buffer itself ([B, H, W, C] uint8) the first time the slot is used."""

    index: int
    count: int
    buffer: torch.Tensor | None


class PoolBoard:
    """The shared slot flags of all workers' batch-buffer pools for one pass, and the buffers as mapped in the
    trainer (`attach`)."""

    def __init__(self, slots: int) -> None:
        self.flags_tensor = torch.zeros(slots, dtype=torch.uint8).share_memory_()
        self.buffers: dict[int, torch.Tensor] = {}

    @property
    def flags(self) -> np.ndarray:
        return self.flags_tensor.numpy()

    def __getstate__(self) -> dict[str, Any]:
        return {"flags_tensor": self.flags_tensor}  # workers need no mapped buffers

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.flags_tensor, self.buffers = state["flags_tensor"], {}

    def attach(self, images: PooledImages) -> torch.Tensor:
        """The [count, C, H, W] (channels_last) images of a pooled batch. Their storage is a view of its own
        on the mapped buffer, so its finalizer fires exactly when the trainer frees the batch and frees the slot."""
        if images.buffer is not None:
            self.buffers[images.index] = images.buffer
        hwc = torch.from_numpy(self.buffers[images.index].numpy()[: images.count])
        weakref.finalize(hwc.untyped_storage(), _release_slot, self.flags_tensor, images.index)
        return hwc.permute(0, 3, 1, 2)


def _release_slot(flags: torch.Tensor, index: int) -> None:
    flags.numpy()[index] = 0


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class BufferPool:
    """The recycled shared-memory batch buffers of one worker: slots `first .. first + POOL_SLOTS` of a board."""

    def __init__(self, board: PoolBoard, first: int) -> None:
        self.flags, self.first = board.flags, first
        self.buffers: list[torch.Tensor | None] = [None] * POOL_SLOTS
        self.sent = [False] * POOL_SLOTS

    def acquire(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, int | None]:
        """(buffer, slot) of a free slot, or (fresh shared buffer, None) when all are in use."""
        for i, buf in enumerate(self.buffers):
            if self.flags[self.first + i] == 0:
                if buf is None or tuple(buf.shape) != shape:
                    buf = self.buffers[i] = _shared_uint8(shape)
                    self.sent[i] = False
                self.flags[self.first + i] = 1
                return buf, i
        return _shared_uint8(shape), None

    def images(self, slot: int, count: int) -> PooledImages:
        buffer = None if self.sent[slot] else self.buffers[slot]
        self.sent[slot] = True
        return PooledImages(self.first + slot, count, buffer)


# Messages from a worker: (_ITEM, item), (_END,), (_FAILED, is_dataset_error, text).
_ITEM, _END, _FAILED = 0, 1, 2

# Signals a worker ignores. Slurm sends the job step's processes SIGTERM on preemption and the pre-timeout
# signal (USR1 by default), and a terminal sends Ctrl-C to the whole process group: each is the trainer's to act
# on (checkpoint, requeue, stop), and it stops its workers itself. A worker whose trainer died exits by itself.
_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _worker_main(
    dataset: StreamDataset,
    worker: int,
    conn: Connection,
    credits: Semaphore,
    board: PoolBoard,
    inherited: list[Connection],
) -> None:
    """One worker process: stream `dataset`'s items for `worker`, at most PREFETCH ahead of the trainer."""
    for s in signal.valid_signals():
        if callable(signal.getsignal(s)):  # a handler of the trainer's (Lightning's), inherited by fork
            signal.signal(s, signal.SIG_DFL)
    for s in _IGNORED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _IGNORED_SIGNALS)  # blocked from before the fork until now
    for c in inherited:  # the trainer's ends of pipes, inherited by fork: only the trainer may hold them
        c.close()
    torch.set_num_threads(1)  # one process per core is the parallelism; intra-op threads would oversubscribe
    parent = os.getppid()
    try:
        items = dataset.worker_items(worker, BufferPool(board, worker * POOL_SLOTS))
        while _credit(credits, parent):
            item = next(items, None)
            if not _send(conn, (_END,) if item is None else (_ITEM, item)) or item is None:
                break
        # The trainer fetches the fds of shared-memory buffers from this process as it unpickles them: stay
        # until it has received every message (all credits are back), or until it stops us.
        all(_credit(credits, parent) for _ in range(PREFETCH))
    except Exception as e:
        is_dataset_error = isinstance(e, DatasetError)
        _send(conn, (_FAILED, is_dataset_error, str(e) if is_dataset_error else traceback.format_exc()))
        while _credit(credits, parent):  # the trainer stops the pass when it reads the failure
            pass


def _send(conn: Connection, message: tuple[Any, ...]) -> bool:
    """Send a message to the trainer; False if it closed the pass."""
    try:
        conn.send(message)
    except BrokenPipeError:
        return False
    return True


def _credit(credits: Semaphore, parent: int) -> bool:
    """Take one credit (the right to send a message); False if the trainer process is gone."""
    while not credits.acquire(timeout=_PARENT_CHECK_S):
        if os.getppid() != parent:
            return False
    return True


class _Worker(NamedTuple):
    process: BaseProcess
    conn: Connection
    credits: Semaphore


def _death(worker: int, process: BaseProcess) -> WorkerError | None:
    """The error for worker `worker` having exited mid-stream; None if it is still running."""
    process.join(timeout=2.0)  # it closed its pipe end on exit: it is a zombie by now, or still running
    code = process.exitcode
    if code is None:
        return None
    how, hint = f"exited with code {code}", "see the log above for the worker's last words"
    if code < 0:
        how = f"was killed by {_signal_name(-code)}"
        if -code == signal.SIGKILL:
            hint = "out of memory? lower data.num_workers or data.batch_size"
    return WorkerError(f"data loader worker {worker} (pid {process.pid}) {how} mid-stream: {hint}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal
        return f"signal {number}"


class _Receiver:
    """The trainer's end of a pass's pipes: the next item in the pass's order (see the module docstring), None
    once every worker has ended. Used by one thread at a time; holds no reference to its `StreamPass`."""

    def __init__(self, workers: list[_Worker], board: PoolBoard) -> None:
        self.workers, self.board = workers, board
        self.turns = collections.deque(range(len(workers)))  # whose batch comes next, then the rest in order

    def next(self) -> dict[str, Any] | None:
        while self.turns:
            w = self.turns[0]
            worker = self.workers[w]
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                # EOF: the worker is gone. A worker that died mid-message, or before the trainer fetched a
                # buffer's fd from it, surfaces as an OSError instead; any other OSError is the trainer's own.
                died = _death(w, worker.process)
                if died is None:
                    raise
                raise died from None
            worker.credits.release()
            if message[0] == _ITEM:
                self.turns.rotate(-1)
                return _finish_batch(message[1], self.board)
            self.turns.popleft()
            if message[0] == _FAILED:
                _, is_dataset_error, text = message
                if is_dataset_error:
                    raise DatasetError(text)
                raise RuntimeError(f"data loader worker {w} failed:\n{text}")
        return None


class _PinThread:
    """Receives and pins items ahead of the trainer in a thread, as the DataLoader's pin thread does: the copy
    into page-locked memory (a few MB per batch) overlaps the training step instead of adding to it. Up to
    `_PINNED_AHEAD` pinned items wait; a failure is handed to the trainer in their place."""

    def __init__(self, receiver: _Receiver) -> None:
        self.queue: queue.Queue[dict[str, Any] | BaseException | None] = queue.Queue(maxsize=_PINNED_AHEAD)
        self.closing = threading.Event()
        self.thread = threading.Thread(
            target=_pin_loop, args=(receiver, self.queue, self.closing), name="ganpipe-pin-memory", daemon=True
        )
        self.thread.start()

    def take(self) -> dict[str, Any] | None:
        out = self.queue.get()
        if isinstance(out, BaseException):
            raise out
        return out

    def drain(self) -> None:
        """Empty the queue, so that a thread blocked putting into it gets through and sees `closing`."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()


_PINNED_AHEAD = 2


def _pin_loop(
    receiver: _Receiver, out: queue.Queue[dict[str, Any] | BaseException | None], closing: threading.Event
) -> None:
    while not closing.is_set():
        result: dict[str, Any] | BaseException | None
        try:
            item = receiver.next()
            result = None if item is None else _pinned(item)
        except Exception as e:
            result = e
        out.put(result)
        if not isinstance(result, dict):
            return


def _shutdown(workers: list[_Worker], pin: _PinThread | None) -> None:
    """Stop a pass: kill its workers (they ignore the polite signals, and nothing of theirs outlives them: the
    shared memory is fd-based), then its pin thread, then close the pipes."""
    if pin is not None:
        pin.closing.set()
    for w in workers:
        if w.process.is_alive():
            w.process.kill()
    deadline = time.monotonic() + 10.0
    for w in workers:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
    while pin is not None and pin.thread.is_alive() and time.monotonic() < deadline:
        pin.drain()  # the killed workers' pipes give EOF, so the thread ends at its next put
        pin.thread.join(timeout=0.05)
    for w in workers:
        w.conn.close()


class StreamPass:
    """One pass over a `StreamLoader`: its worker processes, their pipes, its `PoolBoard`, and with
    `pin_memory` its pin thread. It stops them when it ends, fails, is closed, or is dropped."""

    def __init__(self, dataset: StreamDataset, pin_memory: bool, start_method: str | None = None) -> None:
        self.board = PoolBoard(dataset.num_workers * POOL_SLOTS)
        ctx = mp.get_context(start_method or _default_start_method())
        workers: list[_Worker] = []
        try:
            for w in range(dataset.num_workers):
                workers.append(_start_worker(ctx, dataset, w, self.board, workers))
        except BaseException:
            _shutdown(workers, None)
            raise
        self.workers = workers
        self._receiver = _Receiver(workers, self.board)
        self._pin = _PinThread(self._receiver) if pin_memory else None
        self._shutdown = weakref.finalize(self, _shutdown, workers, self._pin)  # also at interpreter exit

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def __iter__(self) -> StreamPass:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._shutdown.alive:  # ended, failed or closed: nothing more will arrive
            raise StopIteration
        try:
            item = self._pin.take() if self._pin is not None else self._receiver.next()
        except BaseException:
            self.close()
            raise
        if item is None:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the workers (a no-op once done); batches already handed out stay valid."""
        self._shutdown()


def _start_worker(ctx: Any, dataset: StreamDataset, w: int, board: PoolBoard, started: list[_Worker]) -> _Worker:
    reader, writer = ctx.Pipe(duplex=False)
    credits = ctx.Semaphore(PREFETCH)
    # Under fork the child inherits every trainer-side pipe end open so far; it closes them, so that a worker
    # whose trainer died gets a broken pipe instead of blocking on a full one.
    inherited = ([x.conn for x in started] + [reader]) if ctx.get_start_method() == "fork" else []
    process = ctx.Process(
        target=_worker_main,
        args=(dataset, w, writer, credits, board, inherited),
        name=f"ganpipe-data-{w}",
        daemon=True,
    )
    # Blocked across the start, so that the child cannot die of one (or run the trainer's handler) before it
    # ignores them; the trainer gets any that arrive meanwhile when they are unblocked.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED_SIGNALS)
    try:
        process.start()
    except BaseException:
        reader.close()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        writer.close()
    return _Worker(process, reader, credits)


def _default_start_method() -> str | None:
    # fork where there is one (Linux): workers start in milliseconds, and they see the environment as it is now
    # (credentials, GANPIPE_OPS_IMPL), not as it was when a forkserver started; they never touch CUDA.
    return "fork" if "fork" in mp.get_all_start_methods() else None


def _finish_batch(item: dict[str, Any], board: PoolBoard | None) -> dict[str, Any]:
    """An item as the trainer gets it: pooled images attached, numpy arrays (labels, token ids) as tensors."""
    images = item.get("image")
    if isinstance(images, PooledImages):
        assert board is not None
        item["image"] = board.attach(images)
    for name, value in item.items():
        if isinstance(value, np.ndarray):
            item[name] = torch.from_numpy(value)
    return item


def _pinned(item: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of a batch copied to page-locked memory; a pooled batch's slot is free once this returns."""
    for name, value in item.items():
        if isinstance(value, torch.Tensor):
            item[name] = value.pin_memory()
    return item


class StreamLoader:
    """Iterates a `StreamDataset`'s items over `dataset.num_workers` processes (in this process when 0).

    `pin_memory` (default: when CUDA is available) hands out a batch's tensors in page-locked memory, copied
    in a thread ahead of the trainer, so that `.to("cuda", non_blocking=True)` overlaps the copy with compute.
    `start_method` is multiprocessing's ("fork", "forkserver", "spawn"; default: fork where there is one)."""

    def __init__(
        self, dataset: StreamDataset, *, pin_memory: bool | None = None, start_method: str | None = None
    ) -> None:
        self.dataset, self.start_method = dataset, start_method
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.dataset.num_workers == 0:
            items = (_finish_batch(item, None) for item in self.dataset.worker_items(0, None))
            return (_pinned(item) for item in items) if self.pin_memory else items
        return StreamPass(self.dataset, self.pin_memory, self.start_method)


__all__ = ["POOL_SLOTS", "PREFETCH", "BufferPool", "PoolBoard", "PooledImages", "StreamLoader", "StreamPass"]
