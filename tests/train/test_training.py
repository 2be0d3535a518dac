from __future__ import annotations

import csv
import glob
import math

import pytest
import torch
from PIL import Image

from pipeline.data import read_manifest, write_synthetic_dataset
from pipeline.errors import ConfigError
from pipeline.train import list_checkpoints, load_checkpoint, train
from pipeline.train.ema import ema_beta
from pipeline.train.run import dataset_url
from pipeline.train.strategy import lazy_adam_hparams


def test_short_run_leaves_checkpoint_samples_and_logs(make_config) -> None:
    cfg = make_config("train.total_kimg=0.032", "logger.csv=true", "train.log_every_kimg=0.008")
    result = train(cfg)
    assert result.kimg == 0.032
    ckpt = load_checkpoint(result.checkpoint)  # weights_only=True inside
    assert ckpt["counters"] == {"cur_nimg": 32, "step_idx": 4, "ema_nimg": 32}
    assert ckpt["config"]["data"]["batch_size"] == 8
    assert set(ckpt) >= {"G", "D", "G_ema", "optimizers", "objective", "rng", "data", "config"}
    fakes = sorted(glob.glob(f"{cfg.run_dir}/samples/fakes*.png"))
    assert fakes and glob.glob(f"{cfg.run_dir}/samples/reals.png")
    grid = Image.open(fakes[-1])
    assert grid.size == (cfg.train.grid_cols * 16, cfg.train.grid_rows * 16)
    with open(f"{cfg.run_dir}/logs/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    assert {"kimg", "Loss/G/loss", "Loss/D/loss", "Loss/r1_penalty", "Timing/img_per_sec"} <= columns
    losses = [float(r["Loss/D/loss"]) for r in rows if r.get("Loss/D/loss")]
    assert losses and all(math.isfinite(v) for v in losses)


def test_bf16_mixed_trains_with_finite_losses(make_config) -> None:
    cfg = make_config(
        "train.total_kimg=0.024", "train.precision=bf16-mixed", "loss.pl_weight=2", "loss.g_reg_interval=1",
        "loss.d_reg_interval=1", "logger.csv=true", "train.log_every_kimg=0.008",
    )  # fmt: skip
    result = train(cfg)
    with open(f"{cfg.run_dir}/logs/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3  # one row per step: every loss of every phase, each step
    for name in ("Loss/G/loss", "Loss/D/loss", "Loss/pl_penalty", "Loss/r1_penalty", "Loss/scores/real"):
        values = [float(r[name]) for r in rows]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (name, values)
    state = load_checkpoint(result.checkpoint)
    for net in ("G", "D", "G_ema"):
        for key, value in state[net].items():
            assert torch.isfinite(value).all(), f"{net}.{key}"


def test_conditional_training_and_c_dim_mismatch(make_config) -> None:
    probe = make_config()
    num_classes = read_manifest(dataset_url(probe)).num_classes
    cfg = make_config("train.total_kimg=0.016", f"model.c_dim={num_classes}")
    state = load_checkpoint(train(cfg).checkpoint)
    assert state["G"]["mapping.embed.weight"].shape[1] == num_classes
    with pytest.raises(ConfigError, match="model.c_dim"):
        train(make_config(f"model.c_dim={num_classes + 1}", "run_dir=" + cfg.run_dir + "-b"))


def test_resolution_mismatch_with_dataset_is_a_config_error(make_config, tmp_path) -> None:
    write_synthetic_dataset(str(tmp_path / "shards32"), n=16, resolution=32, seed=0)
    with pytest.raises(ConfigError, match="data.resolution=16"):
        train(make_config(f"data.url={tmp_path / 'shards32'}"))


def test_ema_schedule_and_lazy_adam_correction() -> None:
    # Half-life of 10 kimg at batch 32: beta^(10000/32) == 0.5.
    beta = ema_beta(32, ema_kimg=10, ema_rampup=None, cur_nimg=0)
    assert beta ** (10000 / 32) == pytest.approx(0.5)
    # Ramp-up caps the half-life at 5% of images shown.
    assert ema_beta(32, 10, 0.05, cur_nimg=1000) == pytest.approx(0.5 ** (32 / 50))
    lr, betas = lazy_adam_hparams(0.002, (0.0, 0.99), reg_interval=16)
    assert lr == pytest.approx(0.002 * 16 / 17)
    assert betas[1] == pytest.approx(0.99 ** (16 / 17))
    assert lazy_adam_hparams(0.002, (0.0, 0.99), None) == (0.002, (0.0, 0.99))


def test_checkpoint_list_is_in_training_order(make_config) -> None:
    cfg = make_config("train.total_kimg=0.024", "train.checkpoint_every_kimg=0.008", "train.keep_last=5")
    train(cfg)
    nimgs = [load_checkpoint(u)["counters"]["cur_nimg"] for u in list_checkpoints(cfg.run_dir)]
    assert nimgs == [8, 16, 24]
