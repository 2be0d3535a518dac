"""Bad data is skipped, counted by kind, logged with shard and key at a limited rate; too much of it stops training."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import BAD_KINDS, DatasetError, Manifest, ShardInfo, StreamOptions, read_once, write_manifest
from pipeline.data.codec import encode_image
from pipeline.data.stream import StreamMonitor, build_train_stream

FAST = StreamOptions(retries=2, retry_backoff_s=0.01, io_timeout_s=0.5)


def _png(size: int = 16, value: int = 0) -> bytes:
    return encode_image(np.full((size, size, 3), value, dtype=np.uint8), "png")


def _jpg(size: int = 16) -> bytes:
    rng = np.random.default_rng(0)
    return encode_image(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "jpg", 90)


def _sample(key: str, image: bytes | None = None, cls: bytes | None = b"1", txt: bytes | None = b"ok") -> list:
    members = [] if image is None else [(f"{key}.png", image)]
    members += [] if cls is None else [(f"{key}.cls", cls)]
    members += [] if txt is None else [(f"{key}.txt", txt)]
    return members


def write_raw_dataset(root: Path, shards: list[list[tuple[str, bytes]]], *, labels: bool = True) -> None:
    """Shards with exactly the given members (no validation), and a manifest that counts their keys."""
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, members in enumerate(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        name = f"shard-{i:06d}.tar"
        (root / name).write_bytes(data)
        keys = {n.split(".", 1)[0] for n, _ in members}
        infos.append(ShardInfo(name, len(keys), len(data), hashlib.sha256(data).hexdigest()))
    manifest = Manifest(infos, resolution=16, num_classes=3, has_labels=labels, has_captions=True)
    write_manifest(str(root), manifest)


def _good(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [m for i in range(start, start + n) for m in _sample(f"{i:06d}", _png(value=i))]


def test_every_sample_kind_is_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    truncated_jpeg = _jpg()[:200]
    bad = [
        *_sample("a_not_image", b"this is not an image"),
        *_sample("b_corrupt_jpeg", truncated_jpeg),
        *_sample("c_no_image", None),
        *_sample("d_no_label", _png(), cls=None),
        *_sample("e_label_text", _png(), cls=b"cat"),
        *_sample("f_label_range", _png(), cls=b"7"),
        *_sample("g_no_caption", _png(), txt=None),
        *_sample("h_bad_caption", _png(), txt=b"\xff\xfe\xfa"),
        *_sample("i_too_small", _png(8)),
    ]
    write_raw_dataset(tmp_path / "ds", [_good(5) + bad + _good(5, 100)])
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        reader = read_once(str(tmp_path / "ds"), batch_size=4, resolution=16, options=FAST)
        keys = [k for b in reader for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in (*range(5), *range(100, 105))]
    expected = {
        "not_an_image": 1,
        "corrupt_image": 1,
        "missing_image": 1,
        "missing_label": 1,
        "bad_label": 2,
        "missing_caption": 1,
        "bad_caption": 1,
        "wrong_size": 1,
    }
    assert {k: n for k, n in reader.stats.bad.items() if n} == expected
    assert reader.stats.good == 10 and reader.stats.worst_shards == [("shard-000000.tar", 9)]
    for key in ("a_not_image", "b_corrupt_jpeg", "h_bad_caption", "i_too_small"):
        assert any(key in r.getMessage() and "shard-000000.tar" in r.getMessage() for r in caplog.records), key


def test_truncated_and_missing_shards_are_skipped_with_their_samples(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_raw_dataset(root, [_good(6), _good(6, 10), _good(6, 20)])
    data = (root / "shard-000001.tar").read_bytes()
    (root / "shard-000001.tar").write_bytes(data[: len(data) // 2])  # cut inside a member
    (root / "shard-000002.tar").unlink()
    reader = read_once(str(root), resolution=16, options=FAST)
    keys = [item["key"] for item in reader]
    assert keys[:6] == [f"{i:06d}" for i in range(6)] and 1 <= len(keys) - 6 < 6
    stats = reader.stats
    assert stats.bad["shard_unreadable"] == 6  # the manifest's count for the missing shard
    # Every sample of the truncated shard is accounted for: served, lost with the shard, or broken by the cut.
    assert len(keys) - 6 + stats.bad["truncated_tar"] + stats.bad["missing_label"] + stats.bad["corrupt_image"] == 6
    assert stats.bad["truncated_tar"] >= 1
    assert stats.shards_read == 1


def test_bad_samples_are_logged_at_a_limited_rate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    members = [m for i in range(50) for m in _sample(f"{i:06d}", b"junk")] + _good(2, 100)
    write_raw_dataset(tmp_path / "ds", [members])
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        reader = read_once(str(tmp_path / "ds"), options=FAST)
        assert len(list(reader)) == 2
    assert reader.stats.bad["not_an_image"] == 50
    assert 1 <= len([r for r in caplog.records if "not_an_image" in r.getMessage()]) <= 6


def test_monitor_stops_on_too_many_bad_samples_naming_the_worst_shards(tmp_path: Path) -> None:
    junk = [m for i in range(30) for m in _sample(f"j{i:05d}", b"junk")]
    write_raw_dataset(tmp_path / "ds", [_good(20), junk + _good(10, 50)])
    options = StreamOptions(max_bad_fraction=0.1, bad_check_min_samples=20, shuffle_buffer=0)
    loader, monitor = build_train_stream(
        str(tmp_path / "ds"),
        batch_size=4,
        seed=0,
        resolution=16,
        num_batches=20,
        steps_done=0,
        cur_nimg=0,
        options=options,
    )
    for batch in loader:
        monitor.update(batch["stream"])
    totals = monitor.counters()
    assert int(totals[2 + BAD_KINDS.index("not_an_image")]) > 0
    with pytest.raises(DatasetError, match=r"too many bad samples.*shard-000001\.tar.*data\.max_bad_fraction") as info:
        monitor.check(totals)
    assert "\n" not in str(info.value)
    # Under the limit (or before enough samples were read) nothing happens.
    StreamMonitor(monitor.state, 0, StreamOptions(max_bad_fraction=1.0)).check(totals)
    StreamMonitor(monitor.state, 0, StreamOptions(bad_check_min_samples=10**9)).check(totals)


def test_a_dataset_that_cannot_be_read_at_all_is_one_clear_error(tmp_path: Path) -> None:
    write_raw_dataset(tmp_path / "ds", [_good(4), _good(4, 10)])
    for p in (tmp_path / "ds").glob("*.tar"):
        p.unlink()
    loader, _ = build_train_stream(
        str(tmp_path / "ds"),
        batch_size=2,
        seed=0,
        resolution=16,
        num_batches=3,
        steps_done=0,
        cur_nimg=0,
        num_workers=1,
        options=FAST,
    )
    with pytest.raises(DatasetError, match=r"shard reads of .* failed in a row.*credentials") as info:
        list(loader)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)  # the worker's error, one line


def test_stream_counters_ride_in_every_batch(tmp_path: Path) -> None:
    write_raw_dataset(tmp_path / "ds", [_good(8) + _sample("zz_junk", b"junk")])
    loader, _ = build_train_stream(
        str(tmp_path / "ds"), batch_size=3, seed=1, resolution=16, num_batches=6, steps_done=0, cur_nimg=0
    )
    reports = [b["stream"] for b in loader]
    goods = [r.good for r in reports]
    assert goods == sorted(goods) and goods[-1] == 18
    assert reports[-1].bad[BAD_KINDS.index("not_an_image")] >= 1
    assert all(isinstance(v, int) for r in reports for v in (r.slot, r.visit, r.offset, r.good))
    assert torch.is_tensor(next(iter(loader))["image"])
