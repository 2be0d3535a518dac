"""Gradient penalties shared by families: R1 (Mescheder et al. 2018) and path-length regularization (StyleGAN2).

Both differentiate a gradient (create_graph=True), so everything under them must be twice differentiable.
Penalties are computed in float32 even under mixed precision: squared gradients overflow and underflow in 16 bits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def r1_penalty(real_img: Tensor, real_logits: Tensor) -> Tensor:
    """Per-sample ||d D(x) / d x||^2 at real images; `real_img` must require grad and produce `real_logits`."""
    (grads,) = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real_img], create_graph=True, only_inputs=True)
    return grads.float().square().sum(dim=[1, 2, 3])


class PathLengthRegularizer(nn.Module):
    """Penalises (||J_w^T y|| - a)^2 with y ~ N(0, I) / sqrt(H*W) and a the running mean of the lengths.

    Encourages a fixed-size step in w to change the image by a fixed amount, whatever the direction.
    """

    def __init__(self, decay: float = 0.01) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("pl_mean", torch.zeros([]))

    def forward(self, img: Tensor, ws: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (per-sample penalty, per-sample path length); updates the running mean."""
        noise = torch.randn_like(img) / (img.shape[2] * img.shape[3]) ** 0.5
        (grads,) = torch.autograd.grad(outputs=[(img * noise).sum()], inputs=[ws], create_graph=True, only_inputs=True)
        lengths = grads.float().square().sum(dim=2).mean(dim=1).sqrt()
        pl_mean = self.pl_mean.lerp(lengths.mean().detach(), self.decay)
        self.pl_mean.copy_(pl_mean)
        return (lengths - pl_mean).square(), lengths
