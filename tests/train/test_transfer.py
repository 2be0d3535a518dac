"""`ganpipe train RECIPE init=SOURCE freeze_d=N`: a new run starts from converted or earlier weights, with the first
N discriminator layers frozen like NVIDIA's --freezed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.export import convert, open_networks
from pipeline.families import get_family
from pipeline.train import list_checkpoints, load_checkpoint, train
from pipeline.train.transfer import apply_init_weights, check_init_fits
from tests.export.nvlabs_pickle import fixture_snapshot


def test_init_from_a_run_with_frozen_d_layers(make_config, tmp_path: Path) -> None:
    source = make_config("train.total_kimg=0.008", f"run_dir={tmp_path / 'a'}")
    train(source)
    before = load_checkpoint(list_checkpoints(source.run_dir)[-1])

    cfg = make_config("train.total_kimg=0.008", f"run_dir={tmp_path / 'b'}", f"init={source.run_dir}", "freeze_d=4")
    train(cfg)
    after = load_checkpoint(list_checkpoints(cfg.run_dir)[-1])
    assert after["counters"]["cur_nimg"] == 8  # a new run: counters start at zero
    frozen = [k for k in before["D"] if k.startswith("b16.")]  # b16 = fromrgb, conv0, conv1, skip: 4 layers
    assert frozen and all(torch.equal(after["D"][k], before["D"][k]) for k in frozen)
    assert not torch.equal(after["D"]["b8.conv0.weight"], before["D"]["b8.conv0.weight"])  # trained from init...
    assert (after["D"]["b8.conv0.weight"] - before["D"]["b8.conv0.weight"]).abs().max() < 0.1  # ...not from scratch
    assert (after["G"]["mapping.fc0.weight"] - before["G"]["mapping.fc0.weight"]).abs().max() < 0.5
    D = get_family("stylegan2").build("D", get_family("stylegan2").spec(cfg.model, 16))
    trainable = [n for n, _ in D.named_parameters() if not n.startswith("b16.")]
    assert len(after["optimizers"][1]["param_groups"][0]["params"]) == len(trainable)  # frozen layers left out

    with pytest.raises(ConfigError, match=r"freeze_d=8 is invalid: this discriminator has 7 block layers"):
        train(make_config(f"run_dir={tmp_path / 'c'}", "freeze_d=8"))


def test_init_from_nvlabs_pickle_and_converted_folder(tmp_path: Path) -> None:
    pkl, _ = fixture_snapshot("skip_resnet", tmp_path)
    convert("nvlabs", str(pkl), str(tmp_path / "conv"), with_discriminator=True)
    for source in (str(pkl), str(tmp_path / "conv")):
        weights = open_networks(source, training=True)
        assert sorted(weights.states) == ["D", "G", "G_ema"] and weights.resolution == 16
        cfg = config_from_dict({"family": "stylegan2", "model": weights.model, "data": {"resolution": 16}})
        family = get_family("stylegan2")
        spec = family.spec(cfg.model, 16)
        G, G_ema, D = family.build("G", spec), family.build("G_ema", spec), family.build("D", spec)
        model = cfg.to_dict()["model"]
        model["discriminator"]["mbstd_group_size"] = 2  # training-only keys may differ from the source
        check_init_fits(weights, "stylegan2", model, 16)
        apply_init_weights(weights, G, G_ema, D)
        assert torch.equal(G_ema.state_dict()["mapping.fc0.weight"], weights.states["G_ema"]["mapping.fc0.weight"])
        assert torch.equal(G.state_dict()["mapping.fc0.bias"], weights.states["G"]["mapping.fc0.bias"])
        assert not torch.equal(G.state_dict()["mapping.fc0.bias"], G_ema.state_dict()["mapping.fc0.bias"])
        assert torch.equal(D.state_dict()["b4.out.weight"], weights.states["D"]["b4.out.weight"])

        model["synthesis"]["channel_base"] = 512
        with pytest.raises(ConfigError, match=r"model\.synthesis\.channel_base=256 but the recipe has 512"):
            check_init_fits(weights, "stylegan2", model, 16)
        with pytest.raises(ConfigError, match=r"set data\.resolution=16"):
            check_init_fits(weights, "stylegan2", weights.model, 32)
        with pytest.raises(ConfigError, match=r"holds a stylegan2 model but the recipe trains family=other"):
            check_init_fits(weights, "other", weights.model, 16)
