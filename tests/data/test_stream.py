"""The streaming loader: the schedule's math, rank/worker splitting, exact resume, RNG hygiene, batch contents."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter
from itertools import islice
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.data import (
    DatasetError,
    ShardDataset,
    StreamDataset,
    StreamOptions,
    build_train_stream,
    open_source,
    read_once,
)
from pipeline.data.stream import ShardSchedule, StreamMonitor, mix, resume_stream_state
from pipeline.data.workers import POOL_SLOTS, BufferPool, PoolBoard, StreamLoader, StreamPass


def _batches(loader: Any) -> list[dict[str, Any]]:
    return [b for b in loader if "key" in b]


def _train(url: str, **kw: Any) -> tuple[list[dict[str, Any]], StreamMonitor]:
    args: dict[str, Any] = dict(batch_size=4, seed=7, resolution=16, num_batches=12, steps_done=0, cur_nimg=0)
    args.update(kw)
    loader, monitor = build_train_stream(url, **args)
    batches = _batches(loader)
    for b in batches:
        monitor.update(b["stream"])
    return batches, monitor


def test_schedule_modes() -> None:
    resample = ShardSchedule(num_shards=5, num_slots=4, seed=1, mode="resample")
    draws = [resample.shard(s, v) for s in range(4) for v in range(200)]
    assert set(draws) == set(range(5)) and draws == [resample.shard(s, v) for s in range(4) for v in range(200)]
    once = ShardSchedule(num_shards=10, num_slots=4, seed=1, mode="once")
    visited = [[once.shard(s, v) for v in range(4)] for s in range(4)]
    assert visited == [[0, 4, 8, None], [1, 5, 9, None], [2, 6, None, None], [3, 7, None, None]]
    epochs = ShardSchedule(num_shards=10, num_slots=4, seed=1, mode="epochs")
    for e in range(3):  # every epoch deals every shard exactly once over the slots, in a new order
        dealt = [epochs.shard(s, e * epochs.per_slot(s) + j) for s in range(4) for j in range(epochs.per_slot(s))]
        assert sorted(dealt) == list(range(10))
    with pytest.raises(DatasetError, match="resample"):
        ShardSchedule(num_shards=3, num_slots=4, seed=0, mode="epochs")


def test_items_have_the_documented_types_and_content(shards: str) -> None:
    ds = ShardDataset(shards)  # random access: the ground truth for each key
    dataset = StreamDataset(open_source(shards), seed=0, batch_size=8, resolution=16, mode="once")
    batch = _batches(StreamLoader(dataset))[0]
    image = batch["image"]
    assert image.dtype == torch.uint8 and image.shape == (8, 3, 16, 16)
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (8,)
    for i, key in enumerate(batch["key"]):
        ref = ds[int(key)]
        assert torch.equal(image[i], ref["image"]) and int(batch["label"][i]) == int(ref["label"])
        assert batch["caption"][i] == ref["caption"]
    report = batch["stream"]
    assert (report.slot, report.visit, report.offset, report.good) == (0, 0, 8, 8) and sum(report.bad) == 0


def test_once_reads_every_sample_exactly_once_over_ranks_and_workers(shards: str) -> None:
    keys: list[str] = []
    shards_read = []
    for rank in range(2):
        reader = read_once(shards, batch_size=4, num_workers=2, rank=rank, world_size=2)
        keys += [k for b in reader for k in b["key"]]
        assert reader.stats.num_bad == 0
        shards_read.append(reader.stats.shards_read)
    assert sorted(keys) == [f"{i:09d}" for i in range(60)]
    assert shards_read == [4, 2]  # 6 shards dealt to 4 slots: rank 0's slots get 2 each, rank 1's get 1 each


def test_ranks_and_workers_read_disjoint_shards(shards: str) -> None:
    """Each (rank, worker) slot draws from its own stream: no two slots' batches come from a shared position."""
    per_rank = {}
    for rank in range(2):
        batches, _ = _train(shards, rank=rank, world_size=2, num_workers=2, num_batches=20, xflip=True)
        assert len(batches) == 20  # equal batch counts on every rank, whatever the shards
        slots = [b["stream"].slot for b in batches]
        assert slots == [rank * 2 + i % 2 for i in range(20)]  # worker round-robin, in order
        per_rank[rank] = batches
    positions = Counter(
        (b["stream"].slot, b["stream"].visit, b["stream"].offset) for batches in per_rank.values() for b in batches
    )
    assert max(positions.values()) == 1


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import pipeline.data.stream as stream

    calls: list[int] = []
    real = stream.decode_array

    def counting(data: bytes, channels: int) -> np.ndarray:
        calls.append(1)
        return real(data, channels)

    monkeypatch.setattr(stream, "decode_array", counting)
    return calls


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2)])
def test_resume_gives_identical_batches_without_decoding_the_skipped(
    shards: str, world_size: int, num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = StreamOptions(shuffle_buffer=6)  # smaller than a shard: the buffer's own order must replay too
    common = dict(world_size=world_size, num_workers=num_workers, xflip=True, options=options)
    for rank in range(world_size):
        full, _ = _train(shards, rank=rank, num_batches=21, **common)
        # Interrupt after 9 batches; the checkpoint holds every rank's monitor state.
        monitors = [_train(shards, rank=r, num_batches=9, **common)[1] for r in range(world_size)]
        positions = torch.cat([m.positions() for m in monitors])
        saved = monitors[0].state_dict(positions, sum(m.counters() for m in monitors))
        decoded = _count_decodes(monkeypatch)
        resumed, _ = _train(
            shards, rank=rank, num_batches=12, steps_done=9, cur_nimg=9 * 4 * world_size, saved=saved, **common
        )
        monkeypatch.undo()
        assert len(resumed) == 12
        for a, b in zip(full[9:], resumed, strict=True):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        if num_workers == 0:  # in-process: every decode is seen; only the served samples (+ bad ones) decode
            assert len(decoded) == 12 * 4


def test_other_topology_resumes_with_a_fresh_logged_seed(shards: str, caplog: pytest.LogCaptureFixture) -> None:
    _, monitor = _train(shards, num_workers=0, num_batches=5)
    saved = monitor.state_dict(monitor.positions(), monitor.counters())
    batches, new_monitor = _train(shards, num_workers=2, num_batches=6, steps_done=5, cur_nimg=20, saved=saved)
    assert len(batches) == 6
    assert "fresh seed" in caplog.text and "cannot continue" in caplog.text
    assert new_monitor.state.seed != 7 and new_monitor.state.slots_per_rank == 2
    assert int(new_monitor.counters()[0]) == 20 + 24  # counters of the earlier session carry over
    # A checkpoint from before streams existed (no `stream` entry) resumes too.
    old = resume_stream_state(
        {"samples_seen": 20, "seed": 7},
        source=open_source(shards),
        seed=7,
        world_size=1,
        slots_per_rank=1,
        mode="resample",
        cur_nimg=20,
    )
    assert old.seed == mix(7, 20, 5) & 0x7FFFFFFF and old.positions == [[0, 0]]


def test_data_path_leaves_global_rngs_alone(shards: str) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    _train(shards, num_workers=2, xflip=True)
    _train(shards, num_workers=0, xflip=True, options=StreamOptions(crop="random"))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_xflip_mirrors_about_half_and_is_deterministic(shards: str) -> None:
    ds = ShardDataset(shards)
    batches, _ = _train(shards, xflip=True, num_batches=10)
    again, _ = _train(shards, xflip=True, num_batches=10)
    flipped = 0
    for b, c in zip(batches, again, strict=True):
        assert torch.equal(b["image"], c["image"])
        for i, key in enumerate(b["key"]):
            ref = ds[int(key)]["image"]
            assert torch.equal(b["image"][i], ref) or torch.equal(b["image"][i], ref.flip(-1))
            flipped += not torch.equal(b["image"][i], ref)
    assert 8 <= flipped <= 32


def test_crop_then_flip(shards: str) -> None:
    """A flipped, cropped sample is the mirror image of its crop window."""
    ds = ShardDataset(shards)
    batches, _ = _train(shards, resolution=8, num_batches=4, xflip=True)
    flipped = 0
    for b in batches:
        for i, key in enumerate(b["key"]):
            window = ds[int(key)]["image"][:, 4:12, 4:12]
            assert torch.equal(b["image"][i], window) or torch.equal(b["image"][i], window.flip(-1))
            flipped += not torch.equal(b["image"][i], window)
    assert flipped > 0


def test_larger_images_are_cropped_center_or_random(shards: str) -> None:
    ds = ShardDataset(shards)
    centre, _ = _train(shards, resolution=8, num_batches=2)
    rand, _ = _train(shards, resolution=8, num_batches=2, options=StreamOptions(crop="random"))
    assert centre[0]["image"].shape == (4, 3, 8, 8)
    key = centre[0]["key"][0]
    assert torch.equal(centre[0]["image"][0], ds[int(key)]["image"][:, 4:12, 4:12])
    windows = {tuple(ds[int(k)]["image"].shape) for k in rand[0]["key"]}
    assert windows == {(3, 16, 16)} and not all(
        torch.equal(rand[0]["image"][i], ds[int(k)]["image"][:, 4:12, 4:12]) for i, k in enumerate(rand[0]["key"])
    )


def test_worker_memory_stays_flat(shards: str) -> None:
    """No growth with the number of samples: the buffer is bounded and counters have fixed size."""
    ds = StreamDataset(open_source(shards), seed=0, batch_size=None, resolution=16, xflip=True)
    it = iter(ds)
    tracemalloc.start()
    # Warm up under tracing: buffers, caches, and CPython's free lists (which keep up to 2000 freed tuples of
    # each size, e.g. those of 2000 reports) fill once and then stay full.
    list(islice(it, 4000))
    first = tracemalloc.get_traced_memory()[0]
    list(islice(it, 8000))
    grown = tracemalloc.get_traced_memory()[0] - first
    tracemalloc.stop()
    # Bounded state fluctuates by tens of KiB; a leak of 8 bytes per sample would add 64 KiB here.
    assert grown < 48 * 1024, grown


def test_recycled_worker_buffers_never_overwrite_a_held_batch(shards: str) -> None:
    """Workers recycle their shared-memory batch buffers (POOL_SLOTS each) only after the trainer released them:
    batches kept alive stay intact while the stream goes on far past the pool size, and releasing them frees
    their slots for reuse. Each buffer crosses to the trainer once; later batches in it arrive by slot number."""
    import gc

    truth = ShardDataset(shards)
    dataset = StreamDataset(open_source(shards), seed=0, batch_size=2, resolution=16, num_workers=2,
                            num_batches=6 * POOL_SLOTS)  # fmt: skip
    held, seen = [], 0
    it = StreamPass(dataset, pin_memory=False)
    for i, batch in enumerate(it):
        assert isinstance(batch["image"], torch.Tensor) and batch["image"].shape == (2, 3, 16, 16)
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        seen += 1
        if i % 3 == 0:
            held.append(batch)  # kept for the whole stream: its buffer must never be handed out again
    assert seen == 6 * POOL_SLOTS
    # Buffers were sent once per slot, not once per batch: fewer mapped buffers than batches.
    assert 0 < len(it.board.buffers) <= 2 * POOL_SLOTS < seen
    for batch in held:
        for j, key in enumerate(batch["key"]):
            assert torch.equal(batch["image"][j], truth[int(key)]["image"]), key
    assert int(it.board.flags.sum()) >= 1  # the held batches still own their slots
    del batch, held
    gc.collect()
    assert int(it.board.flags.sum()) == 0


def test_pool_sends_each_buffer_once_and_reuses_it_only_when_released() -> None:
    """A slot's buffer crosses the process boundary with its first batch only; later batches in it carry just
    (slot, count), arrive with the new pixels, and a new batch shape sends a new buffer."""
    import gc
    from multiprocessing.reduction import ForkingPickler

    worker_board = PoolBoard(POOL_SLOTS)
    trainer_board = ForkingPickler.loads(ForkingPickler.dumps(worker_board))  # shares the flags, not buffers
    pool = BufferPool(worker_board, first=0)
    for value in (1, 2, 3):
        buffer, slot = pool.acquire((2, 4, 4, 3))
        assert slot == 0  # the released slot is taken again
        buffer.fill_(value)
        sent = pool.images(slot, 2)
        assert (sent.buffer is not None) == (value == 1)
        images = trainer_board.attach(ForkingPickler.loads(ForkingPickler.dumps(sent)))
        assert images.shape == (2, 3, 4, 4) and bool((images == value).all())
        assert pool.acquire((2, 4, 4, 3))[1] == 1  # slot 0 is held by `images`: the next batch gets slot 1
        worker_board.flags[1] = 0
        del images
        gc.collect()
        assert worker_board.flags[0] == 0
    buffer, slot = pool.acquire((1, 4, 4, 3))
    assert slot == 0 and pool.images(slot, 1).buffer is not None


def test_pooled_batches_survive_pinning_and_partial_last_batch(shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pinning (a copy in the pin thread as the batch arrives) a pooled batch's slot is released as soon as
    it was copied, so slots are reused while the pinned copies are still held, and those stay intact and come
    in the same order; without pinning held batches keep their slots. A `once` pass ends with a partial batch
    out of a pooled buffer. Without CUDA, a plain copy stands in for the page-locked one."""
    import gc

    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    truth = ShardDataset(shards)
    ds = StreamDataset(open_source(shards), seed=0, batch_size=4, resolution=16, mode="once", num_workers=2)
    passes = {pin: StreamPass(ds, pin_memory=pin) for pin in (True, False)}
    batches = {pin: [b for b in it if "key" in b] for pin, it in passes.items()}
    assert [b["key"] for b in batches[True]] == [b["key"] for b in batches[False]]
    assert sorted(len(b["key"]) for b in batches[True])[0] < 4  # a partial batch at the end of a worker's shards
    assert sum(len(b["key"]) for b in batches[True]) == len(truth)
    for batch in batches[True]:
        assert batch["image"].is_pinned() == torch.cuda.is_available()
        for j, key in enumerate(batch["key"]):
            assert torch.equal(batch["image"][j], truth[int(key)]["image"]), key
    assert int(passes[True].board.flags.sum()) == 0 and int(passes[False].board.flags.sum()) > 0
    del batch, batches
    gc.collect()
    assert int(passes[False].board.flags.sum()) == 0


def test_monitor_counts_and_positions(shards: str) -> None:
    batches, monitor = _train(shards, num_workers=2, num_batches=7)
    assert int(monitor.counters()[0]) == 28
    last = {b["stream"].slot: b["stream"] for b in batches}
    assert monitor.positions().tolist() == [[last[s].visit, last[s].offset] for s in (0, 1)]
    values = StreamMonitor.log_values(monitor.counters())
    assert values["Data/good"] == 28 and values["Data/bad_fraction"] == 0 and "Data/bad/corrupt_image" in values
