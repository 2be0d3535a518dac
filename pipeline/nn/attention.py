"""Self-attention over feature maps (SAGAN, Zhang et al. 2019), as BigGAN uses it, with BigGAN-PyTorch's names.

For x [N, C, H, W]:
    theta = conv_theta(x)               [N, C/8, H*W]       queries, one per pixel
    phi   = maxpool2(conv_phi(x))       [N, C/8, H*W/4]     keys, on a 2x-pooled grid
    g     = maxpool2(conv_g(x))         [N, C/2, H*W/4]     values
    beta  = softmax_j(theta_i . phi_j)  [N, H*W, H*W/4]
    out   = x + gamma * conv_o(g beta^T)                    gamma is learned and starts at 0
The convolutions are 1x1 without bias; `conv` builds them (spectrally normalised in BigGAN). H and W must be even.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ConvFactory = Callable[..., nn.Module]  # (in_channels, out_channels, kernel_size=, padding=, bias=) -> a conv


class SelfAttention2d(nn.Module):
    """x + gamma * attention(x) over the pixels of x (see the module docstring); `conv` builds the 1x1 convs."""

    def __init__(self, channels: int, conv: ConvFactory) -> None:
        super().__init__()
        if channels < 8:
            raise ValueError(f"self-attention needs at least 8 channels (queries have channels // 8), got {channels}")
        self.channels = channels
        self.theta = conv(channels, channels // 8, kernel_size=1, padding=0, bias=False)
        self.phi = conv(channels, channels // 8, kernel_size=1, padding=0, bias=False)
        self.g = conv(channels, channels // 2, kernel_size=1, padding=0, bias=False)
        self.o = conv(channels // 2, channels, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).view(n, c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(n, c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(n, c // 2, h * w // 4)
        beta = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)
        o = self.o((g @ beta.transpose(1, 2)).view(n, c // 2, h, w))
        return x + self.gamma * o


__all__ = ["ConvFactory", "SelfAttention2d"]
