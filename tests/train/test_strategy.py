"""The gradient-sync seam: `train.strategy` names exactly the registered strategies, and the default one builds
what Lightning needs for one and for several ranks."""

from __future__ import annotations

import typing

import pytest

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.train.distributed import CrossReplicaBatchNormSync, GANStrategy
from pipeline.train.strategy import STRATEGIES, PhaseSync, build_sync


def test_the_config_key_and_the_registry_name_the_same_strategies() -> None:
    hints = typing.get_type_hints(TrainConfig)
    assert set(typing.get_args(hints["strategy"])) == set(STRATEGIES)


def test_phase_sync_for_one_and_several_ranks(make_config) -> None:
    one = build_sync(make_config())
    assert isinstance(one, PhaseSync) and one.trainer_strategy() == "auto" and one.trainer_plugins() == []
    two = build_sync(make_config("train.devices=2", "train.backend=gloo", "train.sync_batchnorm=true"))
    assert isinstance(two.trainer_strategy(), GANStrategy)
    assert [type(p) for p in two.trainer_plugins()] == [CrossReplicaBatchNormSync]
    with pytest.raises(ConfigError, match=r"train\.strategy"):
        make_config("train.strategy=zero9")
