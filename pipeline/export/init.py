"""Weights a new training run starts from (`ganpipe train RECIPE init=SOURCE`): transfer learning / fine-tuning.

`SOURCE` is one of
- a folder written by `ganpipe convert` or `ganpipe export` (generator.json + safetensors files),
- an NVIDIA StyleGAN2-ADA / StyleGAN3 (`--cfg=stylegan2`) network snapshot `.pkl` (converted in memory by
  `pipeline.export.nvlabs`, never executed),
- a ganpipe checkpoint file or run dir (its newest checkpoint).

Contract: the recipe's model must be the source's (same `model` section, except keys that only steer training:
`mapping.w_avg_beta`, `discriminator.mbstd_group_size`, `num_fp16_res`) and the same `data.resolution`; otherwise
a `ConfigError` names the first differing key and the value to set. G starts from the source's G (its G_ema when
the source has no non-EMA G), G_ema from G_ema, D from D when the source has one (else D starts fresh, logged).
Counters, optimizers and augmentation start fresh, as in NVIDIA's `--resume` for transfer learning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.export import META_FILE, load_networks
from pipeline.train.checkpoint import load_checkpoint, resolve_checkpoint

log = logging.getLogger(__name__)

# Keys that change how a network trains, not what its weights mean: a fine-tuning recipe may set them freely.
TRAINING_ONLY_KEYS = {"mapping.w_avg_beta", "discriminator.mbstd_group_size", "synthesis.num_fp16_res",
                      "discriminator.num_fp16_res"}  # fmt: skip


@dataclass
class InitWeights:
    source: str
    model: dict[str, Any]
    resolution: int
    networks: dict[str, dict[str, Tensor]]  # "G_ema" always; "G" and "D" when the source has them


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def read_init_weights(source: str) -> InitWeights:
    """Read `source` (see the module docstring) without executing anything from it."""
    fs, path = fsspec.core.url_to_fs(source)
    if source.endswith(".pkl"):
        from pipeline.export.nvlabs import convert_nvlabs  # late: only NVIDIA sources need the converter

        nets = convert_nvlabs(source, discriminator="if_present")
        for note in nets.notes:
            log.info("init=%s: %s", source, note)
        found = {"G_ema": nets.G_ema, "G": nets.G, "D": nets.D}
        return InitWeights(source, nets.model, nets.resolution, {k: v for k, v in found.items() if v is not None})
    if fs.isdir(path) and fs.exists(f"{path.rstrip('/')}/{META_FILE}"):
        meta, modules = load_networks(source)
        return InitWeights(source, meta.model, meta.resolution, {k: _state(m) for k, m in modules.items()})
    state = load_checkpoint(resolve_checkpoint(source))
    saved = state["config"]
    return InitWeights(
        source, saved["model"], saved["data"]["resolution"], {k: state[k] for k in ("G_ema", "G", "D") if k in state}
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_init_fits(weights: InitWeights, model: dict[str, Any], resolution: int) -> None:
    """ConfigError naming the first model key (or the resolution) where the recipe differs from the source."""
    if resolution != weights.resolution:
        raise ConfigError(
            f"init={weights.source!r} is {weights.resolution}px but data.resolution={resolution}: "
            f"set data.resolution={weights.resolution}"
        )
    ours, theirs = _flatten(model), _flatten(weights.model)
    for key in sorted(set(ours) | set(theirs)):
        if key in TRAINING_ONLY_KEYS or ours.get(key) == theirs.get(key):
            continue
        if key.startswith("discriminator.") and "D" not in weights.networks:
            continue  # D starts fresh, so the recipe's D may differ
        raise ConfigError(
            f"init={weights.source!r} has model.{key}={theirs.get(key)!r} but the recipe has {ours.get(key)!r}: "
            f"set model.{key}={theirs.get(key)} (the weights only fit their own architecture)"
        )


@torch.no_grad()
def apply_init_weights(weights: InitWeights, G: nn.Module, G_ema: nn.Module, D: nn.Module) -> None:
    """Load the source's networks into a new run's G, G_ema and D (strict: every key, every shape)."""
    nets = weights.networks
    G.load_state_dict(nets.get("G", nets["G_ema"]), strict=True)
    G_ema.load_state_dict(nets["G_ema"], strict=True)
    if "D" in nets:
        D.load_state_dict(nets["D"], strict=True)
    else:
        log.info("init=%s has no discriminator: D starts from random weights", weights.source)
    log.info("initialised G, G_ema%s from %s", ", D" if "D" in nets else "", weights.source)


def init_networks(
    source: str, model: dict[str, Any], resolution: int, G: nn.Module, G_ema: nn.Module, D: nn.Module
) -> None:
    """What `init=SOURCE` does to a new run: read, check against the recipe's `model` and resolution, load."""
    weights = read_init_weights(source)
    check_init_fits(weights, model, resolution)
    apply_init_weights(weights, G, G_ema, D)


__all__ = [
    "TRAINING_ONLY_KEYS",
    "InitWeights",
    "apply_init_weights",
    "check_init_fits",
    "init_networks",
    "read_init_weights",
]
