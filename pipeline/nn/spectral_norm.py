"""Spectrally normalised layers (Miyato et al. 2018) with BigGAN-PyTorch's parameter and buffer names.

A layer's effective weight is W / sigma, sigma the largest singular value of W viewed as [out, -1]. sigma is
estimated by power iteration from a stored left singular vector u (buffer `u0`, shape [1, out]); the estimate is
stored too (buffer `sv0`, shape [1]), so names match BigGAN-PyTorch's `SNConv2d`/`SNLinear`/`SNEmbedding`.

Training mode, per forward pass, `num_itrs` times (under no_grad):
    v = normalize(u W),  u = normalize(v W^T)
then sigma = v W^T u^T, differentiable in W (u and v are constants, as in the paper), and u0, sv0 are updated.
u and v are fresh tensors each pass, so calling the layer several times before one backward (gradient
accumulation, fakes and reals in separate passes, R1's double backward) never trips autograd's in-place checks,
and every pass's gradient is that of its own sigma. As in BigGAN-PyTorch, each training-mode pass advances the
iteration once: the state after a step is a function of the passes run, so a resumed run repeats it exactly.

Eval mode runs no power iteration and changes nothing: W / sv0. A generator average (G_ema) holds averaged weights
but its copied u0/sv0 belong to the trained G; `ema_refresh()` (called by `pipeline.train.ema.update_ema` after
each update) re-estimates sv0 for its own weights with one power step from u0 that does not move u0, which is how
BigGAN-PyTorch's eval-mode layers estimate sigma.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _float32_matmuls(weight: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off on the weight's device (where autocast exists at all: not on the meta device)."""
    device = weight.device.type
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


class SpectralNorm:
    """Mixin for a module with a `weight` parameter: see the module docstring. Call `_init_sn` in `__init__`."""

    weight: Tensor
    training: bool

    def _init_sn(self, num_outputs: int, num_itrs: int = 1, eps: float = 1e-12) -> None:
        if num_itrs < 1:
            raise ValueError(f"spectral norm needs at least one power iteration, got {num_itrs}")
        self.num_itrs, self.sn_eps = num_itrs, eps
        self.register_buffer("u0", torch.randn(1, num_outputs))  # type: ignore[attr-defined]
        self.register_buffer("sv0", torch.ones(1))  # type: ignore[attr-defined]

    def _matrix(self) -> Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)  # reshape: a channels_last weight is not viewable

    @torch.no_grad()
    def _power_step(self, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        v = F.normalize(u @ w, eps=self.sn_eps)
        return v, F.normalize(v @ w.t(), eps=self.sn_eps)

    def normalized_weight(self) -> Tensor:
        """W / sigma (see the module docstring for what sigma is in training and eval mode). sigma is computed in
        float32 outside autocast: in bfloat16 it is off by ~0.5%, and so would every layer's scale be."""
        if not self.training:
            return self.weight / self.sv0
        with _float32_matmuls(self.weight):
            w = self._matrix().float()
            u = self.u0.float()
            for _ in range(self.num_itrs):
                v, u = self._power_step(w.detach(), u)
            sigma = (v @ w.t() @ u.t()).squeeze()
        with torch.no_grad():
            self.u0.copy_(u)
            self.sv0.copy_(sigma.detach())
        return self.weight / sigma.to(self.weight.dtype)

    @torch.no_grad()
    def ema_refresh(self) -> None:
        """sv0 for the current weights: one power step from u0 that leaves u0 as it is (also what the BigGAN-PyTorch
        converter and freshly built networks use)."""
        with _float32_matmuls(self.weight):
            w = self._matrix().detach().float()
            v, u = self._power_step(w, self.u0.float())
            self.sv0.copy_((v @ w.t() @ u.t()).reshape(1))


class SNConv2d(nn.Conv2d, SpectralNorm):
    """Conv2d with spectral normalisation; 3x3, padding 1 by default (BigGAN's `which_conv`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = True,
        num_itrs: int = 1,
        eps: float = 1e-12,
    ) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self._init_sn(out_channels, num_itrs, eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding)


class SNLinear(nn.Linear, SpectralNorm):
    """Linear layer with spectral normalisation (BigGAN's `which_linear`)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, num_itrs: int = 1, eps: float = 1e-12
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_sn(out_features, num_itrs, eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SNEmbedding(nn.Embedding, SpectralNorm):
    """An embedding table normalised as a [num_embeddings, dim] matrix (BigGAN-PyTorch's D projection)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, num_itrs: int = 1, eps: float = 1e-12) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self._init_sn(num_embeddings, num_itrs, eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.normalized_weight())


__all__ = ["SNConv2d", "SNEmbedding", "SNLinear", "SpectralNorm"]
