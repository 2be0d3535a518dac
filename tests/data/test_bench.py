"""The data benchmark runs end to end on a small set and prints its table."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from pipeline.data.bench import (
    _SEED,
    bare_samples,
    bench_shards,
    format_table,
    images_per_worker,
    run_bench,
    write_bench_shards,
)
from pipeline.data.stream import StreamDataset, open_source
from pipeline.data.workers import StreamLoader

REPO = Path(__file__).resolve().parents[2]


def test_bench_table() -> None:
    with bench_shards(n=96, resolution=32, per_shard=16) as url:
        rows = run_bench(url, read=200, resolution=32, workers=(1,), batch_size=8, repeats=1)
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
    for b in StreamLoader(dataset, pin_memory=False):
        loader_keys[b["stream"].slot] += b["key"]
    urls = list(open_source(url).shard_urls)
    for w, n in enumerate(images_per_worker(read, workers, batch)):
        bare_keys = [s["__key__"] for s in bare_samples(urls, w, workers, n)]
        assert len(bare_keys) == n == len(loader_keys[w])
        per_shard = Counter(int(k) // 8 for k in bare_keys)
        assert per_shard == Counter(int(k) // 8 for k in loader_keys[w]) and len(per_shard) >= 3


def test_bad_worker_list_is_one_line_and_exit_2(capsys) -> None:
    from pipeline.cli import main

    assert main(["bench", "data", "--workers", "1,two"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--workers '1,two'" in err and "e.g. 1,2" in err
    assert main(["bench", "data", "--workers", "0"]) == 2
    assert main(["bench", "data", "--repeats", "0"]) == 2
    assert main(["bench", "data", "--read", "8", "--batch-size", "32"]) == 2


def test_soak_samples_worker_memory(tmp_path: Path) -> None:
    """`--soak`: ten samples after the first over the stream, each with both workers' resident memory."""
    from pipeline.data.bench import format_soak, soak

    url = str(tmp_path / "shards")
    write_bench_shards(url, 64, 16, 90, per_shard=16)
    samples = soak(url, workers=2, seconds=1.0, batch_size=8, resolution=16)
    assert len(samples) == 11 and samples[-1].seconds >= 1.0
    assert all(b.images > a.images for a, b in itertools.pairwise(samples))
    assert all(len(s.workers) == 2 and min(p for p, _ in s.workers) > 0 for s in samples)
    # A tiny stream reaches its working set at once: private memory stays within a few MiB of the first sample.
    assert max(p for p, _ in samples[-1].workers) <= max(p for p, _ in samples[1].workers) + 16
    assert "| seconds | images | private MiB per worker |" in format_soak(samples, 16)
