"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"), from the paper.

Every image D sees goes through every operation of the policy, each with its own random parameters per sample
(no probability p; the strength is fixed). For images x in [-1, 1], N images, per-sample draws:
- color: brightness x + (u - 1/2); saturation m_c + (x - m_c) * 2u, with m_c the mean over channels (per pixel);
  contrast m + (x - m) * (u + 1/2), with m the mean over channels and pixels. u ~ U(0, 1) drawn for each step.
- translation: shift by integers (dx, dy), each uniform in [-s, s], s = round(ratio * size) with ratio 1/8;
  pixels shifted in from outside are 0.
- cutout: zero a square of side round(ratio * size), ratio 1/2, whose centre is uniform over the image (the
  square is clipped at the borders).
For fixed random draws each operation is affine in x, hence differentiable (twice) with respect to the images.
Randomness comes from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment.base import Augment

DIFFAUGMENT_OPS = ("color", "translation", "cutout")


def color(x: Tensor) -> Tensor:
    n = x.shape[0]
    opts = dict(dtype=x.dtype, device=x.device)
    x = x + (torch.rand(n, 1, 1, 1, **opts) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, **opts) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, **opts) + 0.5) + mean


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, [n, 1, 1], device=x.device)
    dx = torch.randint(-sx, sx + 1, [n, 1, 1], device=x.device)
    # Output pixel (i, j) reads input (i - dy, j - dx) of the zero-padded image: a gather, so gradients flow back
    # to exactly the pixels that were read.
    rows = torch.arange(h, device=x.device)[None, :, None] - dy + sy  # [N, H, 1] into the padded image
    cols = torch.arange(w, device=x.device)[None, None, :] - dx + sx  # [N, 1, W]
    padded = F.pad(x, [sx, sx, sy, sy]).permute(0, 2, 3, 1)  # [N, H + 2sy, W + 2sx, C]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    n, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - size_y % 2), [n, 1, 1], device=x.device)
    cx = torch.randint(0, w + (1 - size_x % 2), [n, 1, 1], device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (
        (rows >= cy - size_y // 2)
        & (rows < cy - size_y // 2 + size_y)
        & (cols >= cx - size_x // 2)
        & (cols < cx - size_x // 2 + size_x)
    )
    return x * (~inside).to(x.dtype)[:, None]


_OPS = {"color": color, "translation": translation, "cutout": cutout}


class DiffAugment(Augment):
    """Applies the policy's operations, in the order given, to every image. Tracks r_t for logging only."""

    def __init__(self, policy: Sequence[str] = DIFFAUGMENT_OPS, interval: int = 4) -> None:
        super().__init__(interval)
        unknown = [op for op in policy if op not in _OPS]
        if unknown:
            raise ValueError(f"unknown DiffAugment operation(s) {unknown}; known: {', '.join(DIFFAUGMENT_OPS)}")
        self.policy = list(policy)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"DiffAugment expects images [N, C, H, W], got shape {list(images.shape)}")
        x = images
        for op in self.policy:
            x = _OPS[op](x)
        return x

    def extra_repr(self) -> str:
        return f"policy={self.policy}"
