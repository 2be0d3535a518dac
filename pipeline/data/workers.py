"""The streaming loader's worker processes: K processes, one per slot, each sending its batches down a pipe.

Contract
    `StreamLoader(dataset)` yields batch i of a pass from worker i mod K while all workers run; a worker whose
    stream ended (only `once` streams end unevenly) leaves the rotation and the next one takes its turn. Exact
    resume depends on this order (see `pipeline.data.stream`). A worker's `DatasetError` is re-raised in the
    trainer as the same one line; any other exception with the worker's traceback; a worker that dies as a
    `WorkerError` naming its exit code or signal. Every pass starts its own workers and stops them when the
    pass ends, fails, or is dropped.

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
import signal
import traceback
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.multiprocessing  # registers torch's shared-memory pickling of tensors for pipes)

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


def _worker_main(
    dataset: StreamDataset,
    worker: int,
    conn: Connection,
    credits: Any,
    board: PoolBoard,
    inherited: list[Connection],
) -> None:
    """One worker process: stream `dataset`'s items for `worker`, at most PREFETCH ahead of the trainer."""
    for c in inherited:  # the trainer's ends of pipes, inherited by fork: only the trainer may hold them
        c.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it then stops us
    torch.set_num_threads(1)  # one process per core is the parallelism; intra-op threads would oversubscribe
    parent = os.getppid()
    try:
        items = dataset.worker_items(worker, BufferPool(board, worker * POOL_SLOTS))
        while _credit(credits, parent):
            item = next(items, None)
            conn.send((_END,) if item is None else (_ITEM, item))
            if item is None:
                break
        # The trainer fetches the fds of shared-memory buffers from this process as it unpickles them: stay
        # until it has received every message (all credits are back), or until it stops us.
        all(_credit(credits, parent) for _ in range(PREFETCH))
    except BrokenPipeError:
        return  # the trainer closed the pass
    except Exception as e:
        is_dataset_error = isinstance(e, DatasetError)
        text = str(e) if is_dataset_error else traceback.format_exc()
        with contextlib.suppress(BrokenPipeError):
            conn.send((_FAILED, is_dataset_error, text))
        while _credit(credits, parent):  # the trainer stops the pass when it reads the failure
            pass


def _credit(credits: Any, parent: int) -> bool:
    """Take one credit (the right to send a message); False if the trainer process is gone."""
    while not credits.acquire(timeout=_PARENT_CHECK_S):
        if os.getppid() != parent:
            return False
    return True


class _Worker(NamedTuple):
    process: Any  # multiprocessing.Process of the default context
    conn: Connection
    credits: Any  # multiprocessing.Semaphore


def _stop(workers: list[_Worker]) -> None:
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    for w in workers:
        w.process.join(timeout=5.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


def _death(worker: int, process: Any) -> WorkerError:
    process.join(timeout=5.0)
    code = process.exitcode
    if code is not None and code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        hint = "out of memory? lower data.num_workers or data.batch_size"
    else:
        how, hint = f"exited with code {code}", "see the worker's output above"
    return WorkerError(f"data loader worker {worker} (pid {process.pid}) {how} mid-stream: {hint}")


class StreamPass:
    """One pass over a `StreamLoader`: its worker processes, their pipes and its `PoolBoard`."""

    def __init__(self, dataset: StreamDataset, pin_memory: bool, start_method: str | None = None) -> None:
        self.dataset, self.pin_memory = dataset, pin_memory
        k = dataset.num_workers
        self.board = PoolBoard(k * POOL_SLOTS)
        ctx = mp.get_context(start_method)
        workers: list[_Worker] = []
        self._stop = weakref.finalize(self, _stop, workers)  # also at interpreter exit
        for w in range(k):
            reader, writer = ctx.Pipe(duplex=False)
            credits = ctx.Semaphore(PREFETCH)
            # Under fork the child inherits every trainer-side pipe end open so far; it closes them, so that
            # a worker whose trainer died gets a broken pipe instead of blocking on a full one.
            inherited = [x.conn for x in workers] + [reader] if ctx.get_start_method() == "fork" else []
            process = ctx.Process(
                target=_worker_main,
                args=(dataset, w, writer, credits, self.board, inherited),
                name=f"ganpipe-data-{w}",
                daemon=True,
            )
            workers.append(_Worker(process, reader, credits))
            process.start()
            writer.close()
        self.workers = workers
        self._turns = collections.deque(range(k))  # whose batch comes next, then the rest in order

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def __iter__(self) -> StreamPass:
        return self

    def __next__(self) -> dict[str, Any]:
        while self._turns:
            w = self._turns[0]
            worker = self.workers[w]
            try:
                message = worker.conn.recv()
            except EOFError:
                self.close()
                raise _death(w, worker.process) from None
            worker.credits.release()
            if message[0] == _ITEM:
                self._turns.rotate(-1)
                return finish_batch(message[1], self.board, self.pin_memory)
            self._turns.popleft()
            if message[0] == _FAILED:
                self.close()
                _, is_dataset_error, text = message
                if is_dataset_error:
                    raise DatasetError(text)
                raise RuntimeError(f"data loader worker {w} failed:\n{text}")
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop the workers (a no-op once done); batches already handed out stay valid."""
        self._turns.clear()
        self._stop()


def finish_batch(item: dict[str, Any], board: PoolBoard | None, pin_memory: bool) -> dict[str, Any]:
    """An item as the trainer gets it: pooled images attached, labels as a tensor, both pinned if asked.

    Pinning happens here, in the trainer's thread: it is the copy that a later non-blocking transfer to the
    GPU needs anyway, and the pooled buffer's slot is free as soon as it is done."""
    images = item.get("image")
    if isinstance(images, PooledImages):
        assert board is not None
        images = item["image"] = board.attach(images)
    if isinstance(item.get("label"), np.ndarray):
        item["label"] = torch.from_numpy(item["label"])
    if pin_memory:
        for name in ("image", "label"):
            if isinstance(item.get(name), torch.Tensor):
                item[name] = item[name].pin_memory()
    return item


class StreamLoader:
    """Iterates a `StreamDataset`'s items over `dataset.num_workers` processes (in this process when 0).

    `pin_memory` (default: when CUDA is available) hands out images and labels in page-locked memory, so that
    `.to("cuda", non_blocking=True)` overlaps the copy with compute. `start_method` is multiprocessing's
    ("fork", "forkserver", "spawn"; default: the platform's); workers never touch CUDA, so fork is safe."""

    def __init__(
        self, dataset: StreamDataset, *, pin_memory: bool | None = None, start_method: str | None = None
    ) -> None:
        self.dataset, self.start_method = dataset, start_method
        self.num_workers = dataset.num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return (finish_batch(item, None, self.pin_memory) for item in self.dataset.worker_items(0, None))
        return StreamPass(self.dataset, self.pin_memory, self.start_method)


__all__ = ["POOL_SLOTS", "PREFETCH", "BufferPool", "PoolBoard", "PooledImages", "StreamLoader", "StreamPass"]
