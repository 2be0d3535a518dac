"""Differentiable augmentation of everything D sees: ADA (adaptive p) and DiffAugment.

`build_augment(cfg, img_channels)` turns the `augment` config section into a pipe (or None for `kind: none`).
The objective passes reals and fakes alike through it before D; the engine calls `end_step` after every step
(ADA's p update) and logs `log_values()`; the pipe's buffers are checkpointed (see `base.Augment`).
"""

from __future__ import annotations

from pipeline.augment.ada import ADA_PIPES, COLOR_OPS, GEOMETRIC_OPS, AdaAugment, AdaOps
from pipeline.augment.base import Augment, Reduce
from pipeline.augment.config import AUGMENT_KINDS, AugmentConfig
from pipeline.augment.diffaugment import DIFFAUGMENT_OPS, DiffAugment
from pipeline.errors import ConfigError


def build_augment(cfg: AugmentConfig, img_channels: int = 3) -> Augment | None:
    """The pipe the config asks for; ConfigError when it cannot work on `img_channels`-channel images."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "diffaugment":
        return DiffAugment(cfg.policy_ops(), interval=cfg.ada_interval)
    if cfg.kind == "ada":
        names = ADA_PIPES[cfg.pipe]
        if img_channels not in (1, 3) and any(n in COLOR_OPS for n in names):
            raise ConfigError(
                f"augment.pipe={cfg.pipe!r} is invalid for {img_channels}-channel images: colour operations need "
                "1 or 3 channels; use augment.pipe=bg"
            )
        return AdaAugment(
            AdaOps.only(*names), p=cfg.p, target=cfg.target, interval=cfg.ada_interval, ada_kimg=cfg.ada_kimg
        )
    raise ConfigError(f"augment.kind={cfg.kind!r} is invalid: choose one of {', '.join(AUGMENT_KINDS)}")


__all__ = [
    "ADA_PIPES",
    "AUGMENT_KINDS",
    "COLOR_OPS",
    "DIFFAUGMENT_OPS",
    "GEOMETRIC_OPS",
    "AdaAugment",
    "AdaOps",
    "Augment",
    "AugmentConfig",
    "DiffAugment",
    "Reduce",
    "build_augment",
]
