"""The StyleGAN3 family record: the alias-free generator of `pipeline.models.stylegan3`, trained as NVIDIA trains it,
with StyleGAN2's discriminator and StyleGAN2's objective (non-saturating loss, lazy R1; path length and style
mixing off in the recipes, the blur on D's inputs on for StyleGAN3-R), class or no conditioning, and the StyleGAN
sampler with the input transform (`--translate`, `--rotate`).

While training, every synthesis layer's input-magnitude EMA decays by NVIDIA's
`magnitude_ema_beta = 0.5 ** (batch_size / 20000)` per step, from the run's total batch; networks rebuilt from an
export or a converted pickle (no training config) keep the layer default, which only matters if they are trained.
NVIDIA's StyleGAN3 has no `cfg=auto` rule, so neither does this family.
"""

from __future__ import annotations

from pipeline.families import Family, NetworkSpec, register_family
from pipeline.families.stylegan2 import INIT_IGNORE_KEYS, check_precision, conditioning
from pipeline.models import stylegan2, stylegan3
from pipeline.models.stylegan_sampling import StyleGAN3Sampler
from pipeline.objectives.stylegan2 import StyleGAN2LossConfig, StyleGAN2Objective


def build_generator(spec: NetworkSpec) -> stylegan3.Generator:
    beta = (
        stylegan3.magnitude_ema_beta(spec.config.data.batch_size)
        if spec.config is not None
        else stylegan3.DEFAULT_MAGNITUDE_EMA_BETA
    )
    return stylegan3.Generator(spec.model, spec.resolution, magnitude_ema_beta=beta)


STYLEGAN3 = register_family(
    Family(
        name="stylegan3",
        model_config=stylegan3.StyleGAN3Config,
        loss_config=StyleGAN2LossConfig,
        build_generator=build_generator,
        build_discriminator=lambda spec: stylegan2.Discriminator(spec.model, spec.resolution),
        build_objective=lambda cfg: StyleGAN2Objective(cfg.loss, cfg.data.batch_size),
        build_conditioning=conditioning,
        sampler=StyleGAN3Sampler,
        init_ignore_keys=INIT_IGNORE_KEYS,
        check_config=check_precision,
    )
)

__all__ = ["STYLEGAN3", "build_generator"]
