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

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
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


__all__ = ["CrossReplicaBatchNorm", "convert_batchnorm"]
