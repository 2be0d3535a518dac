"""Object storage and http through the same code path as local disk: moto S3 and an http server on 127.0.0.1."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from pipeline.data import StreamOptions, open_source, read_once, verify_shards, write_synthetic_dataset
from pipeline.data.stream import build_train_stream


def _keys_and_images(url: str, **kw) -> list[tuple[str, bytes]]:
    reader = read_once(url, resolution=16, **kw)
    return [(item["key"], item["image"].numpy().tobytes()) for item in reader]


def test_s3_write_stream_and_resume_like_local(s3_bucket: str, shards: str) -> None:
    url = f"{s3_bucket}/ds"
    write_synthetic_dataset(url, n=60, resolution=16, seed=3, samples_per_shard=10)  # the same bytes as `shards`
    verify_shards(url)
    assert _keys_and_images(url, num_workers=2) == _keys_and_images(shards, num_workers=2)
    args = dict(batch_size=4, seed=5, resolution=16, steps_done=0, cur_nimg=0, xflip=True, num_workers=2)
    s3_batches = list(build_train_stream(url, num_batches=6, **args)[0])
    local_batches = list(build_train_stream(shards, num_batches=6, **args)[0])
    for a, b in zip(s3_batches, local_batches, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    # Brace expansion over s3 URLs, manifest counts picked up from the folder.
    source = open_source(f"{url}/shard-{{000000..000005}}.tar")
    assert source.num_shards == 6 and source.shard_sizes == (10,) * 6


def test_s3_missing_shard_is_skipped(s3_bucket: str) -> None:
    import s3fs

    url = f"{s3_bucket}/ds"
    write_synthetic_dataset(url, n=20, resolution=16, seed=0, samples_per_shard=10)
    s3fs.S3FileSystem().rm(f"{url}/shard-000001.tar")
    reader = read_once(url, options=StreamOptions(retries=2, retry_backoff_s=0.01))
    assert len(list(reader)) == 10 and reader.stats.bad["shard_unreadable"] == 10


def test_http_stream_404_and_timeout(http_root: tuple[str, Path, set[str]], shards: str) -> None:
    base, root, hang = http_root
    shutil.copytree(shards, root / "ds")
    url = f"{base}/ds"
    assert _keys_and_images(url) == _keys_and_images(shards)
    assert _keys_and_images(f"{url}/shard-{{000000..000005}}.tar", num_workers=2) == _keys_and_images(
        shards, num_workers=2
    )
    (root / "ds" / "shard-000002.tar").unlink()  # 404
    hang.add("ds/shard-000004.tar")  # stalls past the timeout
    try:
        options = StreamOptions(retries=2, retry_backoff_s=0.01, io_timeout_s=0.3)
        start = time.perf_counter()
        reader = read_once(url, options=options)
        keys = [item["key"] for item in reader]
        assert time.perf_counter() - start < 2.5  # two attempts of 0.3 s, not the server's 3 s stall
    finally:
        hang.clear()
    assert len(keys) == 40
    assert reader.stats.bad["shard_unreadable"] == 20
    assert {name for name, _ in reader.stats.worst_shards} == {"shard-000002.tar", "shard-000004.tar"}


def test_unreachable_manifest_is_one_clear_error(http_root: tuple[str, Path, set[str]]) -> None:
    from pipeline.data import DatasetError

    with pytest.raises(DatasetError, match="manifest.json") as info:
        open_source(f"{http_root[0]}/no-such-dataset")
    assert "\n" not in str(info.value)
