"""Loader throughput against the bare decode loop: what `tools/bench_data.py` and `ganpipe bench data` run.

It writes JPEG shards itself (256x256, quality 90 by default; smooth gradients with noise, about the size of
photos at that quality), then measures, for each worker count N:
    loader  the full streaming loader (`StreamDataset` + DataLoader, N workers): tar reading, shuffle buffer,
            decode, x-flip, batching into shared memory, hand-over to the main process
    bare    N processes that only read the same tar members (same tar reader, same fsspec opener) and decode
            them with the same decoder, discarding the result
each over every image once, best of `repeats` passes (the first pass also warms the page cache), and prints a
markdown table with both rates, their ratio and the loader's img/s per worker.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.codec import decode_array, encode_image
from pipeline.data.shards import ShardWriter
from pipeline.data.stream import StreamDataset, StreamOptions, _iter_shard, make_loader, open_source


@dataclass
class BenchRow:
    workers: int
    loader_img_s: float
    bare_img_s: float

    @property
    def ratio(self) -> float:
        return self.loader_img_s / self.bare_img_s


def _image(rng: np.random.Generator, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float32) / r
    a, b, c = rng.uniform(0, 255, size=(3, 3))
    base = np.stack([a[i] * xx + b[i] * yy + c[i] * xx * yy for i in range(3)], axis=-1) % 256
    noise = rng.normal(0, 12, size=(r, r, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_bench_shards(url: str, n: int, resolution: int, quality: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(url, resolution=resolution, image_format="jpg", samples_per_shard=per_shard) as w:
        for i in range(n):
            w.write(f"{i:09d}", encode_image(_image(rng, resolution), "jpg", quality))


def _bare_decode(urls: list[str]) -> int:
    options = StreamOptions()
    n = 0
    for url in urls:
        for sample in _iter_shard(url, options):
            decode_array(sample["jpg"], 3)
            n += 1
    return n


def bare_rate(url: str, workers: int) -> float:
    urls = list(open_source(url).shard_urls)
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        n = sum(pool.map(_bare_decode, [urls[i::workers] for i in range(workers)]))
    return n / (time.perf_counter() - start)


def loader_rate(url: str, workers: int, batch_size: int, resolution: int) -> float:
    dataset = StreamDataset(
        open_source(url),
        seed=0,
        batch_size=batch_size,
        resolution=resolution,
        mode="once",
        xflip=True,
        num_workers=workers,
    )
    start = time.perf_counter()
    n = sum(len(b["key"]) for b in make_loader(dataset, pin_memory=False) if "key" in b)
    return n / (time.perf_counter() - start)


def run_bench(
    n: int = 4000,
    resolution: int = 256,
    quality: int = 90,
    workers: Sequence[int] = (1, 2),
    batch_size: int = 32,
    repeats: int = 3,
    per_shard: int = 250,
    url: str | None = None,
) -> list[BenchRow]:
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-") as tmp:
        url = url or os.path.join(tmp, "shards")
        write_bench_shards(url, n, resolution, quality, per_shard)
        rows = []
        for w in workers:
            bare = max(bare_rate(url, w) for _ in range(repeats))
            loader = max(loader_rate(url, w, batch_size, resolution) for _ in range(repeats))
            rows.append(BenchRow(w, loader, bare))
        return rows


def format_table(rows: list[BenchRow], resolution: int, quality: int, n: int) -> str:
    lines = [
        f"Data loader throughput, {n} JPEG images {resolution}x{resolution} q{quality}, {os.cpu_count()} CPU cores",
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


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="images to write and read (default 4000)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the best counts")
    return parser


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    rows = run_bench(args.n, args.resolution, args.quality, workers, args.batch_size, args.repeats)
    print(format_table(rows, args.resolution, args.quality, args.n))
    return 0
