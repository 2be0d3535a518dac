"""The `augment` config section: defaults, overrides, and one-line errors naming key and fix."""

from __future__ import annotations

import pytest

from pipeline.augment import AdaAugment, build_augment
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import TINY_RECIPE


def test_defaults_and_overrides() -> None:
    cfg = load_config(TINY_RECIPE)
    assert cfg.augment.kind == "none" and build_augment(cfg.augment) is None
    cfg = load_config(TINY_RECIPE, ["augment.kind=ada", "augment.ada_kimg=100", "augment.target=null", "augment.p=0.2"])
    aug = build_augment(cfg.augment)
    assert isinstance(aug, AdaAugment) and aug.p_value == 0.2 and aug.target is None and aug.ada_kimg == 100
    assert cfg.to_dict()["augment"]["kind"] == "ada"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("augment.kind=adaa", "augment.kind='adaa' is invalid: choose one of none, ada, diffaugment"),
        ("augment.targt=0.5", "unknown config key 'augment.targt'; did you mean augment.target"),
        ("augment.p=1.5", "augment.p=1.5 is invalid: must be in [0, 1]"),
        ("augment.target=1.0", "augment.target=1.0 is invalid"),
        ("augment.ada_interval=0", "augment.ada_interval=0 is invalid"),
        ("augment.ada_kimg=0", "augment.ada_kimg=0"),
        ("augment.pipe=bgcfnc", "augment.pipe='bgcfnc' is invalid: choose one of blit, geom, color, bg, bgc"),
        ("augment.policy=color,zoom", "unknown operation zoom"),
        ("augment.p=0.3", "augment.kind is 'none'; set augment.kind=ada"),
    ],
)
def test_bad_values_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY_RECIPE, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_colour_pipe_on_four_channel_images_is_refused() -> None:
    cfg = load_config(TINY_RECIPE, ["augment.kind=ada"])
    with pytest.raises(ConfigError, match="augment.pipe=bg"):
        build_augment(cfg.augment, img_channels=4)
    assert build_augment(load_config(TINY_RECIPE, ["augment.kind=ada", "augment.pipe=bg"]).augment, 4) is not None
