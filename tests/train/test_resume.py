"""Exact resume: a run interrupted and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import find_latest_checkpoint
from pipeline.errors import ConfigError
from pipeline.train import list_checkpoints, load_checkpoint, train

# Every phase and every source of randomness is exercised: style mixing, lazy path length, lazy R1, EMA ramp-up.
ALL_PHASES = [
    "loss.pl_weight=2",
    "loss.style_mixing_prob=0.9",
    "loss.g_reg_interval=2",
    "loss.d_reg_interval=4",
    "loss.r1_gamma=1",
    "data.xflip=true",
    "train.checkpoint_every_kimg=0.04",
    "train.samples_every_kimg=0.05",
]


def test_interrupted_run_matches_uninterrupted(make_config, tmp_path) -> None:
    full = make_config(*ALL_PHASES, f"run_dir={tmp_path / 'full'}", "train.total_kimg=0.136")
    train(full)
    expected = load_checkpoint(list_checkpoints(full.run_dir)[-1])
    assert expected["counters"]["cur_nimg"] == 136

    first = make_config(*ALL_PHASES, f"run_dir={tmp_path / 'split'}", "train.total_kimg=0.056")
    train(first)
    assert load_checkpoint(list_checkpoints(first.run_dir)[-1])["counters"]["cur_nimg"] == 56
    second = make_config(*ALL_PHASES, f"run_dir={tmp_path / 'split'}", "train.total_kimg=0.136")
    train(second, resume="auto")
    resumed = load_checkpoint(list_checkpoints(second.run_dir)[-1])

    assert resumed["counters"] == expected["counters"]
    # Bit for bit: every tensor of every network, the objective's state and every optimizer tensor (moments and
    # step counts), so the next step after this checkpoint would also agree.
    for net in ("G_ema", "G", "D", "objective"):
        assert resumed[net].keys() == expected[net].keys()
        for key, value in expected[net].items():
            assert torch.equal(resumed[net][key], value), f"{net}.{key}"
    assert len(resumed["optimizers"]) == len(expected["optimizers"]) == 2
    for opt_r, opt_e in zip(resumed["optimizers"], expected["optimizers"], strict=True):
        assert opt_r["param_groups"] == opt_e["param_groups"]
        assert opt_r["state"].keys() == opt_e["state"].keys()
        for idx, state in opt_e["state"].items():
            assert state.keys() == opt_r["state"][idx].keys() == {"step", "exp_avg", "exp_avg_sq"}
            for name, value in state.items():
                assert torch.equal(opt_r["state"][idx][name], value), f"optimizer state {idx}.{name}"


def test_without_resume_a_used_run_dir_is_refused(make_config) -> None:
    cfg = make_config("train.total_kimg=0.016")
    train(cfg)
    with pytest.raises(ConfigError, match="--resume auto"):
        train(cfg)
    # Resuming a finished run is a no-op that reports where it stands.
    assert train(cfg, resume="auto").kimg == 0.016


def test_keep_last_and_corrupt_newest_checkpoint_is_skipped(make_config) -> None:
    cfg = make_config("train.total_kimg=0.064", "train.checkpoint_every_kimg=0.016", "train.keep_last=2")
    train(cfg)
    urls = list_checkpoints(cfg.run_dir)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["ckpt-000000000048.pt", "ckpt-000000000064.pt"]
    with open(urls[-1], "r+b") as fh:  # simulate a truncated write of the newest checkpoint
        fh.truncate(1000)
    url, state = find_latest_checkpoint(cfg.run_dir)
    assert url == urls[0] and state["counters"]["cur_nimg"] == 48
    # --resume auto continues from the older valid checkpoint and finishes the run.
    result = train(cfg, resume="auto")
    assert result.kimg == 0.064
