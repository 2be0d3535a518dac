"""The StyleGAN2 family record: networks from `pipeline.models.stylegan2`, objective from
`pipeline.objectives.stylegan2`, class or no conditioning (`model.c_dim`), the StyleGAN sampler, and NVIDIA's
`--cfg=auto` rule.

The `auto` rule (StyleGAN2-ADA `train.py`): with `auto.gpus: N` in a recipe (see `recipes/stylegan2/auto.yaml`),
`pipeline.config.load_config` lays these keys over the recipe; command-line overrides still win. For resolution
`res` and `gpus` GPUs:

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
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, require
from pipeline.families import Family, NetworkSpec, register_family
from pipeline.models import stylegan2
from pipeline.models.conditioning import ClassConditioning, Conditioning, NoConditioning
from pipeline.models.stylegan_sampling import StyleGANSampler
from pipeline.objectives.stylegan2 import StyleGAN2LossConfig, StyleGAN2Objective

if TYPE_CHECKING:
    from pipeline.config import Config

# Keys that change how a network trains, not what its weights mean: a fine-tuning recipe may set them freely.
INIT_IGNORE_KEYS = frozenset(
    {"mapping.w_avg_beta", "discriminator.mbstd_group_size", "synthesis.num_fp16_res", "discriminator.num_fp16_res"}
)


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


def check_precision(cfg: Config) -> None:
    """Per-layer float16 is its own precision recipe: under Lightning's autocast it would silently become bfloat16,
    so the two exclude each other."""
    for name in ("synthesis", "discriminator"):
        section = getattr(cfg.model, name)
        require(
            section.num_fp16_res == 0 or cfg.train.precision == "32",
            f"model.{name}.num_fp16_res",
            section.num_fp16_res,
            f"float16 layers need train.precision=32 (got {cfg.train.precision}); set model.{name}.num_fp16_res=0 "
            "to use bf16-mixed",
        )


def conditioning(spec: NetworkSpec) -> Conditioning:
    c_dim = spec.model.c_dim
    return ClassConditioning(c_dim, encoding="onehot", key="model.c_dim") if c_dim > 0 else NoConditioning()


STYLEGAN2 = register_family(
    Family(
        name="stylegan2",
        model_config=stylegan2.StyleGAN2Config,
        loss_config=StyleGAN2LossConfig,
        build_generator=lambda spec: stylegan2.Generator(spec.model, spec.resolution),
        build_discriminator=lambda spec: stylegan2.Discriminator(spec.model, spec.resolution),
        build_objective=lambda cfg: StyleGAN2Objective(cfg.loss, cfg.data.batch_size),
        build_conditioning=conditioning,
        sampler=StyleGANSampler,
        derive_auto=lambda resolution, gpus: nvlabs_auto(resolution, gpus).as_overrides(),
        init_ignore_keys=INIT_IGNORE_KEYS,
        check_config=check_precision,
    )
)

__all__ = ["INIT_IGNORE_KEYS", "STYLEGAN2", "AutoHparams", "check_precision", "conditioning", "nvlabs_auto"]
