"""Loader throughput against the bare decode loop: what `tools/bench_data.py` and `ganpipe bench data` run.

It writes JPEG shards itself (256x256, quality 90 by default; smooth gradients with noise, about the size of
photos at that quality), then measures, for each worker count N, a stream of `read` images (several passes'
worth, so that starting the processes weighs about as little as it does in training):
    loader  the streaming loader as training runs it (`StreamDataset` in its default resampled mode +
            `StreamLoader`, N worker processes): tar reading, shuffle buffer, decode, x-flip, batching into
            shared memory, hand-over to the main process (not the copy into pinned memory that a CUDA host adds)
    bare    N processes that read the same tar members (the same shards, drawn by the same `ShardSchedule`,
            with the same tar reader and fsspec opener) and decode them with the same decoder, discarding the
            result
best of `repeats` alternating passes of each (the first also warms the page cache), and prints a markdown table
with both rates, their ratio and the loader's img/s per worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.codec import decode_array, encode_image
from pipeline.data.shards import ShardWriter
from pipeline.data.stream import ShardSchedule, StreamDataset, StreamOptions, _iter_shard, open_source
from pipeline.data.workers import StreamLoader, StreamPass


@dataclass
class BenchRow:
    workers: int
    loader_img_s: float
    bare_img_s: float

    @property
    def ratio(self) -> float:
        return self.loader_img_s / self.bare_img_s


def _image(rng: np.random.Generator, r: int, noise: np.ndarray) -> np.ndarray:
    """A colour gradient plus a random window of the shared noise tile (drawing fresh noise per image would make
    writing the shards several times slower than reading them)."""
    ramp = np.arange(r, dtype=np.float32) / r
    yy, xx = ramp[:, None, None], ramp[None, :, None]
    a, b, c = rng.uniform(0, 255, size=(3, 1, 1, 3)).astype(np.float32)
    y, x = rng.integers(0, r, size=2)
    return np.clip((a * xx + b * yy + c * xx * yy) % 256 + noise[y : y + r, x : x + r], 0, 255).astype(np.uint8)


def write_bench_shards(url: str, n: int, resolution: int, quality: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 12, size=(2 * resolution, 2 * resolution, 3)).astype(np.float32)
    with ShardWriter(url, resolution=resolution, image_format="jpg", samples_per_shard=per_shard) as w:
        for i in range(n):
            w.write(f"{i:09d}", encode_image(_image(rng, resolution, noise), "jpg", quality))


_SEED = 0  # the loader's stream seed; the bare loop draws the same shards with it


def bare_samples(urls: list[str], slot: int, num_slots: int, images: int) -> Iterator[dict[str, Any]]:
    """The first `images` raw samples of the shards that `slot` of the loader's stream visits, in tar order."""
    schedule = ShardSchedule(len(urls), num_slots, _SEED, "resample")
    options = StreamOptions()
    n, visit = 0, 0
    while n < images:
        for sample in _iter_shard(urls[schedule.shard(slot, visit)], options):
            yield sample
            n += 1
            if n == images:
                return
        visit += 1


def _bare_decode(urls: list[str], slot: int, num_slots: int, images: int) -> int:
    n = 0
    for sample in bare_samples(urls, slot, num_slots, images):
        decode_array(sample["jpg"], 3)
        n += 1
    return n


def images_per_worker(read: int, workers: int, batch_size: int) -> list[int]:
    """How many images each loader worker delivers in a stream of `read` images (whole batches, round-robin)."""
    batches = read // batch_size
    return [len(range(w, batches, workers)) * batch_size for w in range(workers)]


def bare_rate(url: str, workers: int, read: int, batch_size: int) -> float:
    urls = list(open_source(url).shard_urls)
    jobs = [(urls, w, workers, n) for w, n in enumerate(images_per_worker(read, workers, batch_size))]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        n = sum(pool.starmap(_bare_decode, jobs))
    return n / (time.perf_counter() - start)


def loader_rate(url: str, workers: int, read: int, batch_size: int, resolution: int) -> float:
    dataset = StreamDataset(
        open_source(url),
        seed=_SEED,
        batch_size=batch_size,
        resolution=resolution,
        xflip=True,
        num_workers=workers,
        num_batches=read // batch_size,
    )
    start = time.perf_counter()
    n = sum(len(b["key"]) for b in StreamLoader(dataset, pin_memory=False))
    return n / (time.perf_counter() - start)


def _resident_mib(pid: int) -> tuple[int, int]:
    """(private, shared-memory) resident MiB of a process, from /proc (Linux)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) // 1024
    return fields["RssAnon"], fields["RssShmem"]


@dataclass
class SoakSample:
    seconds: float
    images: int
    workers: list[tuple[int, int]]  # per worker: (private, shared-memory) resident MiB


def soak(url: str, workers: int, seconds: float, batch_size: int, resolution: int) -> list[SoakSample]:
    """Stream for `seconds` as training does and sample each worker's resident memory ten times."""
    dataset = StreamDataset(
        open_source(url), seed=_SEED, batch_size=batch_size, resolution=resolution, xflip=True, num_workers=workers
    )
    it = StreamPass(dataset, pin_memory=False)
    images = len(next(it)["key"])
    pids = it.worker_pids
    start = time.perf_counter()
    samples = [SoakSample(0.0, images, [_resident_mib(pid) for pid in pids])]
    for i in range(1, 11):  # at least one batch between samples, however far behind schedule
        images += len(next(it)["key"])
        while time.perf_counter() - start < seconds * i / 10:
            images += len(next(it)["key"])
        samples.append(SoakSample(time.perf_counter() - start, images, [_resident_mib(pid) for pid in pids]))
    it.close()
    return samples


def format_soak(samples: list[SoakSample], resolution: int) -> str:
    lines = [
        f"Worker memory while streaming {resolution}x{resolution} JPEG batches ({len(samples[0].workers)} workers)",
        "",
        "| seconds | images | private MiB per worker | shared-memory MiB per worker |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for s in samples:
        private = " / ".join(str(p) for p, _ in s.workers)
        shared = " / ".join(str(m) for _, m in s.workers)
        lines.append(f"| {s.seconds:.0f} | {s.images} | {private} | {shared} |")
    return "\n".join(lines)


@contextmanager
def bench_shards(
    n: int = 4000, resolution: int = 256, quality: int = 90, per_shard: int = 250, url: str | None = None
) -> Iterator[str]:
    """A folder of freshly written bench shards (`url`, or a temporary one removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-") as tmp:
        url = url or os.path.join(tmp, "shards")
        write_bench_shards(url, n, resolution, quality, per_shard)
        yield url


def run_bench(
    url: str,
    read: int,
    resolution: int = 256,
    workers: Sequence[int] = (1, 2),
    batch_size: int = 32,
    repeats: int = 3,
) -> list[BenchRow]:
    """Loader and bare-loop rates over the shards at `url`, per worker count."""
    rows = []
    for w in workers:
        # Alternating passes, so that a slow spell of a shared machine hits both sides alike.
        bare = loader = 0.0
        for _ in range(repeats):
            bare = max(bare, bare_rate(url, w, read, batch_size))
            loader = max(loader, loader_rate(url, w, read, batch_size, resolution))
        rows.append(BenchRow(w, loader, bare))
    return rows


def format_table(rows: list[BenchRow], resolution: int, quality: int, n: int, read: int) -> str:
    lines = [
        f"Data loader throughput: {read} images streamed from {n} JPEG images {resolution}x{resolution} q{quality}, "
        f"{os.cpu_count()} CPU cores",
        "",
        "| workers | loader img/s | bare decode img/s | ratio | loader img/s per worker |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.workers} | {r.loader_img_s:.0f} | {r.bare_img_s:.0f} | {r.ratio:.2f} | "
            f"{r.loader_img_s / r.workers:.0f} |"
        )
    return "\n".join(lines)
