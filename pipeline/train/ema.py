"""Exponential moving average of the generator's weights (G_ema), with StyleGAN2-ADA's half-life schedule.

The half-life is `ema_kimg` thousand images; with `ema_rampup` it is at most `ema_rampup * images shown so far`,
so early in training the average forgets fast. With `ema_start_kimg`, G_ema is a plain copy of G until that many
images were shown (BigGAN-PyTorch's `ema_start`). Buffers (w_avg, noise constants, BN statistics) are copied, not
averaged; then every submodule with an `ema_refresh()` method recomputes what it derives from its own weights
(a spectral norm's singular value: `pipeline.nn.spectral_norm`).
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch_size: int, ema_kimg: float, ema_rampup: float | None, cur_nimg: int) -> float:
    """Per-step decay for a global batch of `batch_size` images at `cur_nimg` images shown."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, source: nn.Module, beta: float) -> None:
    """ema <- source + (ema - source) * beta for parameters; buffers copied, then `ema_refresh()` hooks run."""
    ema_params = list(ema.parameters())
    src_params = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(ema_params, src_params, 1.0 - beta)
    for b_ema, b_src in zip(ema.buffers(), source.buffers(), strict=True):
        b_ema.copy_(b_src)
    for module in ema.modules():
        refresh = getattr(module, "ema_refresh", None)
        if callable(refresh):
            refresh()
