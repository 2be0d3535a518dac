"""Cross-replica BatchNorm: batch statistics over the whole global batch, every rank's samples, on any backend.

BigGAN normalises G's activations with statistics of the global batch ("cross-replica BN"): with a few images
per GPU, per-device statistics are noisy and training suffers. torch's `SyncBatchNorm` does this on GPUs only;
`CrossReplicaBatchNorm` works wherever `torch.distributed` does (gloo on CPUs, NCCL on GPUs), so the equivalence
of R ranks to one process can be tested anywhere.

In training, with a process group of more than one rank, for input x [N, C, *]:
    mean = sum_r sum(x_r) / sum_r n_r            (one all-reduce)
    var  = sum_r sum((x_r - mean)^2) / sum_r n_r  (a second one: the centred, two-pass variance, stable in float32)
    y    = (x - mean) / sqrt(var + eps) * weight + bias
and the running statistics follow mean and the unbiased var * n / (n - 1), as `nn.BatchNorm2d` does with the whole
batch. The all-reduces are `torch.distributed.nn.functional.all_reduce`, differentiable (twice): a rank's input
receives the gradient of every rank's loss through the shared statistics, so averaging gradients over the ranks
(the gradient-sync strategy does) gives exactly the gradient of one process with the whole batch. Outside
training, or in a single process, it is a plain BatchNorm. Statistics are per forward pass, as BatchNorm's are:
with `train.batch_gpu` accumulation they are those of one round's images on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CrossReplicaBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over N, C, * inputs (1d, 2d or 3d) with statistics of the global batch (see the module docstring)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        local_count = torch.full([1], xf.numel() / xf.shape[1], device=x.device, dtype=torch.float32)
        totals = dist_fn.all_reduce(torch.cat([xf.sum(dims), local_count]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = xf - mean.view(shape)
        var = dist_fn.all_reduce(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, to_cross_replica: bool = True) -> nn.Module:
    """Every BatchNorm1d/2d/3d in `module` as a `CrossReplicaBatchNorm` (or back, with `to_cross_replica=False`),
    sharing the original parameters and buffers; returns the converted module (the same object unless `module`
    itself is a BatchNorm)."""
    source = nn.modules.batchnorm._BatchNorm if to_cross_replica else CrossReplicaBatchNorm
    if isinstance(module, source) and not (to_cross_replica and isinstance(module, CrossReplicaBatchNorm)):
        target = CrossReplicaBatchNorm if to_cross_replica else _PlainBatchNorm
        out = target(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        converted = convert_batchnorm(child, to_cross_replica)
        if converted is not child:
            setattr(module, name, converted)
    return module


class _PlainBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of any dimension (what `convert_batchnorm(..., to_cross_replica=False)` gives back)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}")


def check_truncation(truncation: float, error: type[Exception] = ValueError) -> None:
    """BigGAN's truncation T must lie in (0, 1] (the release's statistics and its z = T * truncnorm(-2, 2))."""
    if not 0 < truncation <= 1:
        raise error(f"--trunc {truncation} is invalid: give a truncation in (0, 1]")


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional BatchNorm (de Vries et al. 2017) as BigGAN uses it:

        out = bn(x) * (1 + gain(y)) + bias(y)        y [N, cond_dim]: BigGAN's [shared class embedding, z chunk]

    `bn` is a BatchNorm2d without its own affine (so `train.sync_batchnorm` makes it cross-replica like any other),
    `gain` and `bias` are bias-free linear maps built by `linear(in, out, bias=False)` (spectrally normalised in
    BigGAN). With `cond_dim=None` it is a plain BatchNorm2d with a learned affine (BigGAN's output layer).

    Truncation statistics (`n_stats > 0`, BigGAN-deep's public release): buffers `truncation_means` and
    `truncation_vars` [n_stats, C] hold the statistics measured at truncations k / (n_stats - 1); in eval mode a
    forward with `truncation=t` normalises with a blend of the two rows around t, computed exactly as the
    release's own code does (`truncation_statistics`), so converted weights reproduce its images.
    """

    def __init__(
        self,
        num_features: int,
        cond_dim: int | None,
        linear: Callable[..., nn.Module] = nn.Linear,
        eps: float = 1e-5,
        momentum: float = 0.1,
        n_stats: int = 0,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=cond_dim is None)
        self.conditional = cond_dim is not None
        if cond_dim is not None:
            self.gain = linear(cond_dim, num_features, bias=False)
            self.bias = linear(cond_dim, num_features, bias=False)
        self.n_stats = n_stats
        if n_stats:
            if n_stats < 2:
                raise ValueError(f"truncation statistics need at least 2 rows, got {n_stats}")
            self.register_buffer("truncation_means", torch.zeros(n_stats, num_features))
            self.register_buffer("truncation_vars", torch.ones(n_stats, num_features))

    def truncation_statistics(self, truncation: float) -> tuple[Tensor, Tensor]:
        """(mean, var) for truncation t in (0, 1]: rows i = floor(t / step) and i + 1 mixed as
        row_i * frac + row_{i+1} * (1 - frac) (the release's weighting, kept as is: it is what its G was sampled
        with), or row i alone when t sits on the grid."""
        check_truncation(truncation)
        frac, whole = math.modf(truncation / (1.0 / (self.n_stats - 1)))
        i = int(whole)
        means, variances = self.truncation_means, self.truncation_vars
        if frac == 0.0:
            return means[i], variances[i]
        return means[i] * frac + means[i + 1] * (1 - frac), variances[i] * frac + variances[i + 1] * (1 - frac)

    def forward(self, x: Tensor, y: Tensor | None = None, truncation: float | None = None) -> Tensor:
        if self.n_stats and truncation is not None and not self.training:
            mean, var = self.truncation_statistics(truncation)
            out = F.batch_norm(x, mean, var, self.bn.weight, self.bn.bias, False, 0.0, self.bn.eps)
        else:
            out = self.bn(x)
        if not self.conditional:
            return out
        if y is None:
            raise ValueError("a conditional batch norm needs its conditioning vector y")
        return out * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]


@torch.no_grad()
def standing_statistics(module: nn.Module, forward: Callable[[], object], num_batches: int) -> None:
    """BigGAN's "standing statistics": every BatchNorm of `module` re-estimates its running statistics as the
    plain average over `num_batches` calls of `forward()` (which runs `module` on fresh inputs), replacing what
    training's momentum average accumulated. Only the BatchNorms switch to training mode meanwhile: every other
    layer keeps its mode (spectral norms in eval mode do not iterate). Each BatchNorm's mode is restored after."""
    if num_batches < 1:
        raise ValueError(f"standing statistics need at least one batch, got {num_batches}")
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for _ in range(num_batches):
            forward()
    finally:
        for m, (momentum, training) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.train(training)


__all__ = [
    "ConditionalBatchNorm2d",
    "CrossReplicaBatchNorm",
    "check_truncation",
    "convert_batchnorm",
    "standing_statistics",
]
