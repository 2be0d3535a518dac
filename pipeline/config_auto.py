"""NVIDIA's `--cfg=auto` rule (StyleGAN2-ADA `train.py`): StyleGAN2 hyperparameters from resolution and GPU count.

With `auto.gpus: N` in a recipe (see `recipes/stylegan2/auto.yaml`), `pipeline.config.load_config` computes
`AutoHparams` from `data.resolution` and N and lays the resulting keys over the recipe; command-line overrides
still win. The rule, for resolution `res` and `gpus` GPUs:

    batch    = max(min(gpus * min(4096 // res, 32), 64), gpus)
    mbstd    = min(batch // gpus, 4)                    minibatch-std group size (per GPU batch, at most 4)
    fmaps    = 1 if res >= 512 else 0.5                 channel_base = fmaps * 32768, channel_max = 512
    lr       = 0.002 if res >= 1024 else 0.0025         G and D
    gamma    = 0.0002 * res**2 / batch                  R1 weight
    ema_kimg = batch * 10 / 32, ema_rampup = 0.05
    mapping layers = 2, conv_clamp = 256 (NVIDIA pairs it with float16 in the top 4 resolutions)

As in NVIDIA's script, the derived values are computed once from the auto batch: overriding `data.batch_size`
afterwards does not recompute gamma or the EMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, require


@dataclass
class AutoConfig:
    """`auto.gpus`: the GPU count the `auto` rule sizes the run for; null = the rule is off."""

    gpus: int | None = None

    def validate(self, prefix: str) -> None:
        require(self.gpus is None or self.gpus >= 1, f"{prefix}.gpus", self.gpus, "must be a GPU count >= 1 or null")


@dataclass(frozen=True)
class AutoHparams:
    batch_size: int
    mbstd_group_size: int
    channel_base: int
    g_lr: float
    d_lr: float
    r1_gamma: float
    ema_kimg: float
    ema_rampup: float = 0.05
    mapping_layers: int = 2
    conv_clamp: float = 256

    def as_overrides(self) -> dict[str, Any]:
        """The recipe keys this rule sets (a nested dict in the recipe's shape)."""
        clamp = {"channel_base": self.channel_base, "channel_max": 512, "conv_clamp": self.conv_clamp}
        return {
            "data": {"batch_size": self.batch_size},
            "model": {
                "mapping": {"num_layers": self.mapping_layers},
                "synthesis": dict(clamp),
                "discriminator": {**clamp, "mbstd_group_size": self.mbstd_group_size},
            },
            "optim": {"g_lr": self.g_lr, "d_lr": self.d_lr},
            "loss": {"r1_gamma": self.r1_gamma},
            "train": {"ema_kimg": self.ema_kimg, "ema_rampup": self.ema_rampup},
        }


def nvlabs_auto(resolution: int, gpus: int) -> AutoHparams:
    """NVIDIA's cfg=auto values for `resolution` x `resolution` images on `gpus` GPUs."""
    if resolution < 1 or gpus < 1:
        raise ConfigError(f"auto rule needs a positive resolution and GPU count, got {resolution} and {gpus}")
    batch = max(min(gpus * min(4096 // resolution, 32), 64), gpus)
    fmaps = 1 if resolution >= 512 else 0.5
    lr = 0.002 if resolution >= 1024 else 0.0025
    return AutoHparams(
        batch_size=batch,
        mbstd_group_size=min(batch // gpus, 4),
        channel_base=int(fmaps * 32768),
        g_lr=lr,
        d_lr=lr,
        r1_gamma=0.0002 * resolution**2 / batch,
        ema_kimg=batch * 10 / 32,
    )


def auto_layer(raw: dict[str, Any], default_resolution: int) -> dict[str, Any] | None:
    """The keys the `auto` rule sets for the merged recipe dict `raw` (whose `data.resolution` defaults to
    `default_resolution`), or None when `auto.gpus` is not set."""
    auto = raw.get("auto")
    if auto is None:
        return None
    if not isinstance(auto, dict):
        raise ConfigError(f"auto={auto!r} is invalid: it is a section, give it as auto.gpus=N")
    gpus = auto.get("gpus")
    if gpus is None:
        return None
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ConfigError(f"auto.gpus={gpus!r} is invalid: must be a GPU count >= 1 or null")
    if raw.get("family", "stylegan2") != "stylegan2":
        raise ConfigError(f"auto.gpus is set but family={raw.get('family')!r}: the auto rule is StyleGAN2's")
    resolution = (raw.get("data") or {}).get("resolution", default_resolution)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ConfigError(f"data.resolution={resolution!r} is invalid: must be a power of two >= 8")
    return nvlabs_auto(resolution, gpus).as_overrides()


__all__ = ["AutoConfig", "AutoHparams", "auto_layer", "nvlabs_auto"]
