"""The one registry of network families: name -> config dataclass and builders of G and D.

A family module defines its networks and nothing about training. Every generator exposes `z_dim`, `c_dim`,
`img_resolution`, `img_channels` and `forward(z, c, truncation_psi=..., noise_mode=...) -> images in [-1, 1]`;
every discriminator `forward(img, c) -> logits [N, 1]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.models import stylegan2


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    build_generator: Callable[[Any, int], nn.Module]
    build_discriminator: Callable[[Any, int], nn.Module]


FAMILIES: dict[str, Family] = {
    "stylegan2": Family(
        "stylegan2", stylegan2.StyleGAN2Config, stylegan2.build_generator, stylegan2.build_discriminator
    ),
}

MODEL_CONFIGS: dict[str, type] = {name: fam.config_cls for name, fam in FAMILIES.items()}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "MODEL_CONFIGS", "Family", "get_family"]
