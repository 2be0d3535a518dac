"""The BigGAN family record: BigGAN and BigGAN-deep networks (`pipeline.models.biggan`, `model.architecture`), the
hinge objective with D steps and orthogonal regularization (`pipeline.objectives.biggan`), class conditioning by
embedding index (or none: `model.c_dim: 0`), and the truncated-z sampler with standing statistics.

Recipes: `recipes/biggan/` (tiny, cifar10, imagenet128, imagenet256-deep). Converters: `hf-biggan` (the public
BigGAN-deep release) and `biggan-pytorch` (BigGAN-PyTorch's G_ema.pth), in `pipeline.export.converters.biggan`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import require
from pipeline.families import Family, NetworkSpec, register_family
from pipeline.models import biggan
from pipeline.models.biggan_sampling import BigGANSampler
from pipeline.models.conditioning import ClassConditioning, Conditioning, NoConditioning
from pipeline.objectives.biggan import BigGANLossConfig, BigGANObjective

if TYPE_CHECKING:
    from pipeline.config import Config

# Keys that change how a network trains or samples, not what its weights mean.
INIT_IGNORE_KEYS = frozenset({"init", "sn_itrs", "standing_stats", "standing_batch"})


def conditioning(spec: NetworkSpec) -> Conditioning:
    c_dim = spec.model.c_dim
    return ClassConditioning(c_dim, encoding="index", key="model.c_dim") if c_dim > 0 else NoConditioning()


def check_config(cfg: Config) -> None:
    cfg.model.check_resolution(cfg.data.resolution)
    require(
        cfg.model.n_stats == 0,
        "model.n_stats",
        cfg.model.n_stats,
        "per-truncation statistics come with converted releases and are not trained: set 0 to train",
    )


BIGGAN = register_family(
    Family(
        name="biggan",
        model_config=biggan.BigGANConfig,
        loss_config=BigGANLossConfig,
        build_generator=lambda spec: biggan.Generator(spec.model, spec.resolution),
        build_discriminator=lambda spec: biggan.Discriminator(spec.model, spec.resolution),
        build_objective=lambda cfg: BigGANObjective(cfg.loss),
        build_conditioning=conditioning,
        sampler=BigGANSampler,
        init_ignore_keys=INIT_IGNORE_KEYS,
        check_config=check_config,
    )
)

__all__ = ["BIGGAN", "INIT_IGNORE_KEYS", "check_config", "conditioning"]
