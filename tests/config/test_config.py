from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ConfigError, config_from_dict, load_config, load_recipe, parse_overrides, to_yaml
from tests.conftest import REPO, TINY_RECIPE


def test_tiny_recipe_resolves_with_base_values() -> None:
    cfg = load_config(TINY_RECIPE)
    assert cfg.family == "stylegan2"
    assert cfg.data.resolution == 32
    assert cfg.model.mapping.num_layers == 2  # tiny's own value
    assert cfg.model.mapping.lr_multiplier == 0.01  # inherited from base.yaml
    assert cfg.loss.d_reg_interval == 16


def test_overrides_win_and_are_typed() -> None:
    cfg = load_config(TINY_RECIPE, ["data.batch_size=64", "optim.betas=[0.5,0.9]", "train.ema_kimg=null"])
    assert cfg.data.batch_size == 64
    assert tuple(cfg.optim.betas) == (0.5, 0.9)
    assert cfg.train.ema_kimg is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=-3", "data.batch_size=-3"),
        ("data.resolution=48", "power of two"),
        ("loss.r1_gamma=-1", "loss.r1_gamma"),
        ("train.precision=16", "train.precision"),
        ("data.batch_size=abc", "data.batch_size"),
        ("model.synthesis.architecture=dense", "model.synthesis.architecture"),
        ("optim.betas=[0.5,1.5]", "optim.betas"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction=2.0"),
        ("data.crop=left", "data.crop"),
        ("data.retries=0", "data.retries"),
        ("data.synth.layout=diagonal", "data.synth.layout='diagonal' is invalid: must be one of grid, centred"),
        ("data.block_size=16", "data.block_size"),
    ],
)
def test_invalid_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY_RECIPE, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("data.batchsize=8", "data.batch_size"),
        ("data.shufle_buffer=8", "data.shuffle_buffer"),
        ("loss.r1_gama=1", "loss.r1_gamma"),
        ("trian.total_kimg=1", "train"),
    ],
)
def test_unknown_keys_suggest_the_closest(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY_RECIPE, [override])
    assert "unknown config key" in str(err.value)
    assert suggestion in str(err.value)


def test_unknown_family_and_malformed_override() -> None:
    with pytest.raises(ConfigError, match="family='stylegan9'"):
        load_config(None, ["family=stylegan9"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["data.batch_size"])


def test_base_cycle_and_missing_recipe(tmp_path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_recipe(str(a))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_round_trip_through_plain_dict() -> None:
    cfg = load_config(TINY_RECIPE, ["model.c_dim=5"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert "c_dim: 5" in to_yaml(cfg)


@pytest.mark.parametrize(
    ("override", "key"), [("data.batch_size=-3", "data.batch_size"), ("data.batchsize=8", "data.batch_size")]
)
def test_cli_config_errors_exit_2_with_one_line(override: str, key: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config", TINY_RECIPE, override],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]
    assert "Traceback" not in proc.stderr
