"""The data benchmark runs end to end on a small set and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.data.bench import (
    _SEED,
    bare_samples,
    format_table,
    images_per_worker,
    run_bench,
    write_bench_shards,
)
from pipeline.data.stream import StreamDataset, make_loader, open_source

REPO = Path(__file__).resolve().parents[2]


def test_bench_table() -> None:
    rows = run_bench(n=96, read=200, resolution=32, workers=(1,), batch_size=8, repeats=1, per_shard=16)
    assert len(rows) == 1 and rows[0].loader_img_s > 0 and rows[0].bare_img_s > 0
    table = format_table(rows, 32, 90, 96, 200)
    assert "| workers | loader img/s | bare decode img/s | ratio | loader img/s per worker |" in table


def test_bench_script_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/bench_data.py", "--n", "64", "--resolution", "32", "--workers", "1", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout


def test_bare_loop_reads_the_loaders_tar_members(tmp_path: Path) -> None:
    """The comparison is fair: each bare process reads as many samples from each shard as the matching loader
    worker delivers (the same members, except which ones of the last, partly read shard: the loader shuffles)."""
    from collections import Counter

    url = str(tmp_path / "shards")
    write_bench_shards(url, 60, 16, 90, per_shard=8)
    workers, read, batch = 2, 100, 4
    dataset = StreamDataset(open_source(url), seed=_SEED, batch_size=batch, resolution=16, num_workers=workers,
                            num_batches=read // batch)  # fmt: skip
    loader_keys: dict[int, list[str]] = {0: [], 1: []}
    for b in make_loader(dataset, pin_memory=False):
        loader_keys[b["stream"].slot] += b["key"]
    urls = list(open_source(url).shard_urls)
    for w, n in enumerate(images_per_worker(read, workers, batch)):
        bare_keys = [s["__key__"] for s in bare_samples(urls, w, workers, n)]
        assert len(bare_keys) == n == len(loader_keys[w])
        per_shard = Counter(int(k) // 8 for k in bare_keys)
        assert per_shard == Counter(int(k) // 8 for k in loader_keys[w]) and len(per_shard) >= 3
