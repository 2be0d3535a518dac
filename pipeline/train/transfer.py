"""Transfer learning: the weights a new run starts from (`init=SOURCE`) and the discriminator layers it keeps
frozen (`freeze_d=N`).

`SOURCE` is anything `pipeline.export.open_networks` reads: an export or `ganpipe convert` folder, a ganpipe
checkpoint or run dir (its newest checkpoint), or a foreign checkpoint a converter claims (an NVIDIA
StyleGAN2-ADA / StyleGAN3 snapshot `.pkl`, converted in memory, never executed).

Contract: the source must be of the recipe's family, with the same `data.resolution` and the same `model` section,
except the keys the family lists in `init_ignore_keys` (they steer training, not what the weights mean; StyleGAN2:
`mapping.w_avg_beta`, `discriminator.mbstd_group_size`, `num_fp16_res`); otherwise a `ConfigError` names the first
differing key and the value to set. G starts from the source's G (its G_ema when the source has no non-EMA G),
G_ema from G_ema, D from D when the source has one (else D starts fresh, logged). Counters, optimizers and
augmentation start fresh, as in NVIDIA's `--resume` for transfer learning.

`freeze_d=N` (Mo et al. 2020, NVIDIA's `--freezed`) stops training D's first N layers in the family's
`freeze_order`: they keep their (initial) weights and still pass gradients through.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.export import NetworkSource, open_networks

log = logging.getLogger(__name__)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_init_fits(source: NetworkSource, family: str, model: dict[str, Any], resolution: int) -> None:
    """ConfigError naming the first thing (family, resolution, model key) where the recipe differs from the source."""
    if family != source.family:
        raise ConfigError(
            f"init={source.url!r} holds a {source.family} model but the recipe trains family={family}: "
            f"use a {source.family} recipe or another init"
        )
    if resolution != source.resolution:
        raise ConfigError(
            f"init={source.url!r} is {source.resolution}px but data.resolution={resolution}: "
            f"set data.resolution={source.resolution}"
        )
    ignore = source.family_record.init_ignore_keys
    ours, theirs = _flatten(model), _flatten(source.model)
    for key in sorted(set(ours) | set(theirs)):
        if key in ignore or ours.get(key) == theirs.get(key):
            continue
        if key.startswith("discriminator.") and "D" not in source.states:
            continue  # D starts fresh, so the recipe's D may differ
        raise ConfigError(
            f"init={source.url!r} has model.{key}={theirs.get(key)!r} but the recipe has {ours.get(key)!r}: "
            f"set model.{key}={theirs.get(key)} (the weights only fit their own architecture)"
        )


@torch.no_grad()
def apply_init_weights(source: NetworkSource, G: nn.Module, G_ema: nn.Module, D: nn.Module) -> None:
    """Load the source's networks into a new run's G, G_ema and D (strict: every key, every shape)."""
    states = source.states
    G.load_state_dict(states.get("G", states["G_ema"]), strict=True)
    G_ema.load_state_dict(states["G_ema"], strict=True)
    if "D" in states:
        D.load_state_dict(states["D"], strict=True)
    else:
        log.info("init=%s has no discriminator: D starts from random weights", source.url)
    log.info("initialised G, G_ema%s from %s", ", D" if "D" in states else "", source.url)


def init_networks(
    url: str, family: str, model: dict[str, Any], resolution: int, G: nn.Module, G_ema: nn.Module, D: nn.Module
) -> None:
    """What `init=SOURCE` does to a new run: read, check against the recipe's family, model and resolution, load."""
    source = open_networks(url, training=True)
    for note in source.notes:
        log.info("init=%s: %s", url, note)
    check_init_fits(source, family, model, resolution)
    apply_init_weights(source, G, G_ema, D)


def freeze_discriminator(D: torch.nn.Module, num_layers: int) -> None:
    """Stop training D's first `num_layers` layers (`freeze_d`, NVIDIA's --freezed): they keep their weights
    (e.g. from `init=`), pass gradients through to G and to R1's inputs, and are left out of D's optimizer."""
    order = getattr(D, "freeze_order", None)
    if order is None:
        raise ConfigError(f"freeze_d={num_layers} is invalid: this family's discriminator has no layer order")
    layers = order()
    if num_layers > len(layers):
        raise ConfigError(f"freeze_d={num_layers} is invalid: this discriminator has {len(layers)} block layers")
    for layer in layers[:num_layers]:
        layer.requires_grad_(False)


__all__ = ["apply_init_weights", "check_init_fits", "freeze_discriminator", "init_networks"]
