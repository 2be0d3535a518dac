"""The published-hyperparameter recipes resolve to NVIDIA's numbers, and the `auto` rule matches NVIDIA's table."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.families.stylegan2 import nvlabs_auto
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_resolves_and_has_a_header(recipe) -> None:
    load_config(str(recipe))
    assert recipe.read_text().startswith("#"), "each recipe starts with a comment saying what it is"


def test_ffhq1024_matches_nvidia_paper1024_via_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config", "recipes/stylegan2/ffhq1024.yaml"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    # StyleGAN2-ADA train.py cfg_specs['paper1024']: ref_gpus=8, kimg=25000, mb=32, mbstd=4, fmaps=1, lrate=0.002,
    # gamma=2, ema=10, ramp=None, map=8; shared by every spec: channel_max 512, num_fp16_res 4, conv_clamp 256,
    # Adam betas (0, 0.99), eps 1e-8; loss defaults pl_weight 2, style mixing 0.9, lazy intervals 4 / 16.
    assert cfg["data"]["resolution"] == 1024 and cfg["data"]["batch_size"] == 32
    assert cfg["train"]["total_kimg"] == 25000 and cfg["train"]["ema_kimg"] == 10 and cfg["train"]["ema_rampup"] is None
    assert cfg["optim"] == {"g_lr": 0.002, "d_lr": 0.002, "betas": [0.0, 0.99], "eps": 1e-8}
    assert cfg["loss"]["r1_gamma"] == 2 and cfg["loss"]["pl_weight"] == 2 and cfg["loss"]["style_mixing_prob"] == 0.9
    assert cfg["loss"]["g_reg_interval"] == 4 and cfg["loss"]["d_reg_interval"] == 16
    model = cfg["model"]
    assert model["z_dim"] == model["w_dim"] == 512 and model["mapping"]["num_layers"] == 8
    for net in ("synthesis", "discriminator"):
        assert model[net]["channel_base"] == 32768 and model[net]["channel_max"] == 512
        assert model[net]["conv_clamp"] == 256 and model[net]["num_fp16_res"] == 4
    assert model["synthesis"]["architecture"] == "skip" and model["discriminator"]["architecture"] == "resnet"
    assert model["discriminator"]["mbstd_group_size"] == 4
    assert cfg["augment"]["kind"] == "ada" and cfg["augment"]["target"] == 0.6


def test_paper256_and_cifar_specs() -> None:
    c = load_config(str(REPO / "recipes/stylegan2/ffhq256.yaml"))
    assert (c.data.batch_size, c.model.discriminator.mbstd_group_size, c.model.synthesis.channel_base) == (64, 8, 16384)
    assert (c.optim.g_lr, c.loss.r1_gamma, c.train.ema_kimg, c.model.mapping.num_layers) == (0.0025, 1, 20, 8)
    c = load_config(str(REPO / "recipes/stylegan2/cifar10.yaml"))
    assert (c.model.c_dim, c.data.batch_size, c.model.discriminator.mbstd_group_size) == (10, 64, 32)
    assert (c.loss.r1_gamma, c.train.ema_kimg, c.train.ema_rampup, c.model.mapping.num_layers) == (0.01, 500, 0.05, 2)
    assert (c.loss.pl_weight, c.loss.style_mixing_prob, c.model.discriminator.architecture) == (0, 0, "orig")
    assert c.train.total_kimg == 100000


# NVlabs/stylegan3 docs/configs.md, "Old StyleGAN2-ADA configurations": --cfg=auto as explicit options.
@pytest.mark.parametrize(
    ("res", "gpus", "batch", "gamma", "lr", "cbase"),
    [
        (128, 1, 32, 0.1024, 0.0025, 16384),
        (128, 4, 64, 0.0512, 0.0025, 16384),
        (256, 1, 16, 0.8192, 0.0025, 16384),
        (256, 8, 64, 0.2048, 0.0025, 16384),
        (512, 2, 16, 3.2768, 0.0025, 32768),
        (512, 8, 64, 0.8192, 0.0025, 32768),
        (1024, 1, 4, 52.4288, 0.002, 32768),
        (1024, 8, 32, 6.5536, 0.002, 32768),
    ],
)
def test_auto_rule_matches_nvidia_table(res: int, gpus: int, batch: int, gamma: float, lr: float, cbase: int) -> None:
    h = nvlabs_auto(res, gpus)
    assert (h.batch_size, h.channel_base, h.g_lr, h.d_lr, h.mapping_layers) == (batch, cbase, lr, lr, 2)
    assert h.r1_gamma == pytest.approx(gamma) and h.ema_kimg == pytest.approx(batch * 10 / 32)
    assert h.mbstd_group_size == min(batch // gpus, 4) and h.ema_rampup == 0.05


def test_auto_recipe_follows_resolution_and_gpus_and_overrides_win() -> None:
    recipe = str(REPO / "recipes/stylegan2/auto.yaml")
    c = load_config(recipe, ["data.resolution=512", "auto.gpus=2", "loss.r1_gamma=3"])
    assert (c.data.batch_size, c.model.synthesis.channel_base, c.model.discriminator.channel_base) == (16, 32768, 32768)
    assert c.loss.r1_gamma == 3  # the command line wins over the rule
    assert c.train.ema_kimg == 5 and c.model.discriminator.mbstd_group_size == 4 and c.auto.gpus == 2
    off = load_config(recipe, ["auto.gpus=null"])
    assert off.loss.r1_gamma == 10 and off.data.batch_size == 32  # base.yaml's values when the rule is off
    with pytest.raises(ConfigError, match=r"auto\.gpus=0 is invalid"):
        load_config(recipe, ["auto.gpus=0"])
    with pytest.raises(ConfigError, match=r"auto\.gpus='x' is invalid"):
        load_config(recipe, ["auto.gpus=x"])


def test_init_and_freeze_d_keys() -> None:
    c = load_config(str(REPO / "recipes/stylegan2/tiny.yaml"), ["init=exports/ffhq", "freeze_d=10"])
    assert c.init == "exports/ffhq" and c.freeze_d == 10
    with pytest.raises(ConfigError, match=r"freeze_d=-1 is invalid"):
        load_config(str(REPO / "recipes/stylegan2/tiny.yaml"), ["freeze_d=-1"])
