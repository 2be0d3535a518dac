"""Training reads through the stream: local disk and S3 give the same run, resume with workers is exact, and too
much bad data stops training with one clear error while keeping what was written."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from pipeline.data import BAD_KINDS, DatasetError, write_synthetic_dataset
from pipeline.train import list_checkpoints, load_checkpoint, train


def _assert_same_weights(a: dict, b: dict) -> None:
    for net in ("G", "D", "G_ema"):
        for key, value in a[net].items():
            torch.testing.assert_close(b[net][key], value, rtol=0, atol=0, msg=f"{net}.{key}")


def _loader_workers() -> list[str]:
    """Data loader workers of this process still running (a finished or failed run must leave none)."""
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("ganpipe-data")]


def test_local_and_s3_train_identically_with_only_the_url_changed(make_config, tmp_path: Path, s3_bucket: str) -> None:
    local = str(tmp_path / "shards")
    for url in (local, f"{s3_bucket}/shards"):
        write_synthetic_dataset(url, n=48, resolution=16, seed=1, samples_per_shard=12)
    states = []
    for name, url in (("local", local), ("s3", f"{s3_bucket}/shards")):
        cfg = make_config(f"data.url={url}", f"run_dir={tmp_path / name}", "train.total_kimg=0.016", "data.xflip=true")
        states.append(load_checkpoint(train(cfg).checkpoint))
    _assert_same_weights(states[0], states[1])
    stream = states[0]["data"]["stream"]
    assert stream == states[1]["data"]["stream"] and stream["world_size"] == 1 and len(stream["positions"]) == 1
    assert states[0]["data"]["counters"][0] == 16 and sum(states[0]["data"]["counters"][2:]) == 0


def test_resume_with_two_workers_is_exact(make_config, tmp_path: Path) -> None:
    common = ["data.num_workers=2", "data.xflip=true", "train.checkpoint_every_kimg=0.024"]
    full = make_config(*common, f"run_dir={tmp_path / 'full'}", "train.total_kimg=0.056")
    expected = load_checkpoint(train(full).checkpoint)
    first = make_config(*common, f"run_dir={tmp_path / 'split'}", "train.total_kimg=0.024")
    train(first)
    second = make_config(*common, f"run_dir={tmp_path / 'split'}", "train.total_kimg=0.056")
    resumed = load_checkpoint(train(second, resume="auto").checkpoint)
    assert resumed["counters"] == expected["counters"] == {"cur_nimg": 56, "step_idx": 7, "ema_nimg": 56}
    assert resumed["data"]["stream"] == expected["data"]["stream"]
    assert len(expected["data"]["stream"]["positions"]) == 2 and _loader_workers() == []
    _assert_same_weights(expected, resumed)


def test_too_many_bad_samples_stop_training_and_keep_checkpoints(make_config, tmp_path: Path) -> None:
    url = tmp_path / "shards"
    write_synthetic_dataset(str(url), n=40, resolution=16, seed=0, samples_per_shard=8)
    cfg = make_config(
        f"data.url={url}",
        "train.total_kimg=0.4",
        "train.checkpoint_every_kimg=0.008",
        "train.log_every_kimg=0.008",
        "logger.csv=true",
        "data.max_bad_fraction=0.2",
        "data.bad_check_min_samples=8",
        "data.num_workers=2",
    )
    train(make_config(f"data.url={url}", f"run_dir={cfg.run_dir}", "train.total_kimg=0.008", "data.num_workers=2"))
    for shard in ("shard-000001.tar", "shard-000003.tar"):
        (url / shard).write_bytes(b"\0" * 100)  # not a tar any more: every sample in it is lost
    with pytest.raises(DatasetError, match=r"too many bad samples.*shard-00000[13]\.tar") as info:
        train(cfg, resume="auto")
    assert "\n" not in str(info.value) and _loader_workers() == []
    checkpoints = list_checkpoints(cfg.run_dir)
    assert checkpoints and load_checkpoint(checkpoints[-1])["counters"]["cur_nimg"] >= 8
    state = load_checkpoint(checkpoints[-1])
    assert len(state["data"]["counters"]) == 2 + len(BAD_KINDS)
    assert (Path(cfg.run_dir) / "logs" / "metrics.csv").exists()
