"""The pure-PyTorch references shared by the public ops and the Triton backend: `upfirdn2d_ref` with its argument
parsers, the activation table (`ACTIVATIONS`, `ActivationSpec`, the SELU constants) and `bias_act_ref`.

This module is the bottom of pipeline.ops' import graph: it imports torch only, never a public op module, so
that `_custom_ops` (whose fallbacks are these references) and `_triton_kernels` (which needs the constants) can
import it at the top while the public op modules import `_custom_ops` at the top in turn:

    _dispatch, _ref  <-  _custom_ops  <-  upfirdn2d, bias_act  <-  conv2d_resample, modulated_conv2d,
                                                                   filtered_lrelu  <-  pipeline.ops, bench

The public modules re-export what used to live there (`pipeline.ops.upfirdn2d.parse_padding`,
`pipeline.ops.bias_act.ACTIVATIONS`, ...). The references are compositions of differentiable torch ops, so they
support gradients of any order; their semantics are documented in upfirdn2d.py and bias_act.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Scaling = int | Sequence[int]
Padding = int | Sequence[int]


# ---------------------------------------------------------------------------------------------------- upfirdn2d


def parse_scaling(scaling: Scaling) -> tuple[int, int]:
    """Resampling factor as (x, y) from an int or an (x, y) pair; each >= 1."""
    if isinstance(scaling, int):
        scaling = (scaling, scaling)
    assert isinstance(scaling, (list, tuple)) and len(scaling) == 2, f"expected int or (x, y), got {scaling!r}"
    assert all(isinstance(s, int) and s >= 1 for s in scaling), f"factors must be ints >= 1, got {scaling!r}"
    return scaling[0], scaling[1]


def parse_padding(padding: Padding) -> tuple[int, int, int, int]:
    """Padding as (x_before, x_after, y_before, y_after) from an int, an (x, y) pair or the 4-tuple itself."""
    if isinstance(padding, int):
        padding = (padding, padding)
    assert isinstance(padding, (list, tuple)) and len(padding) in (2, 4), f"bad padding {padding!r}"
    assert all(isinstance(p, int) for p in padding), f"padding must be ints, got {padding!r}"
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    return padding[0], padding[1], padding[2], padding[3]


def filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """(width, height) of a prepared filter: None is 1x1, a 1-D filter of t taps is t x t."""
    if f is None:
        return 1, 1
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2), "filter must be a 1-D or 2-D tensor (or None)"
    fw, fh = int(f.shape[-1]), int(f.shape[0])
    assert fw >= 1 and fh >= 1
    return fw, fh


def upfirdn2d_ref(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 1,
    down: Scaling = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
) -> torch.Tensor:
    """Reference upfirdn2d: zero insertion by reshape + pad, F.pad (crops when negative), depthwise conv2d whose
    stride does the downsampling (only the kept outputs are computed). Also the fused ops' fallback."""
    n, c, h, w = x.shape
    ux, uy = parse_scaling(up)
    dx, dy = parse_scaling(down)
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)

    # 1. Zero insertion: each sample is followed by (factor - 1) zeros along each axis.
    if ux > 1 or uy > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, ux - 1, 0, 0, 0, uy - 1]).reshape(n, c, h * uy, w * ux)
    # 2. Pad with zeros or crop (F.pad crops on negative amounts).
    if px0 or px1 or py0 or py1:
        x = F.pad(x, [px0, px1, py0, py1])

    # 3 + 4. Filter and downsample.
    if f is None:
        x = x[:, :, : x.shape[2] - fh + 1 : dy, : x.shape[3] - fw + 1 : dx]
        return x * gain if gain != 1 else x
    k = f.to(x.dtype) * (gain ** (f.ndim / 2))
    if not flip_filter:  # conv2d correlates, so a true convolution needs the flipped filter
        k = k.flip(list(range(k.ndim)))
    if k.ndim == 2:
        return F.conv2d(x, k.expand(c, 1, fh, fw), stride=(dy, dx), groups=c)
    x = F.conv2d(x, k.reshape(1, 1, 1, fw).expand(c, 1, 1, fw), stride=(1, dx), groups=c)
    return F.conv2d(x, k.reshape(1, 1, fh, 1).expand(c, 1, fh, 1), stride=(dy, 1), groups=c)


# ----------------------------------------------------------------------------------------------------- bias_act


@dataclass(frozen=True)
class ActivationSpec:
    """One activation: `func(x, alpha)`, its default alpha and its default output gain."""

    name: str
    func: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float


def _linear(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x


def _relu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.relu(x)


def _lrelu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.leaky_relu(x, alpha)


def _tanh(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.tanh(x)


def _sigmoid(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.sigmoid(x)


def _elu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.elu(x)


def _selu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.selu(x)


def _softplus(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.softplus(x)


def _swish(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * torch.sigmoid(x)


_SQRT2 = math.sqrt(2)
# F.selu's constants (Klambauer et al. 2017), needed by the fused kernels and their written-out derivatives.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

ACTIVATIONS: dict[str, ActivationSpec] = {
    spec.name: spec
    for spec in (
        ActivationSpec("linear", _linear, def_alpha=0.0, def_gain=1.0),
        ActivationSpec("relu", _relu, def_alpha=0.0, def_gain=_SQRT2),
        ActivationSpec("lrelu", _lrelu, def_alpha=0.2, def_gain=_SQRT2),
        ActivationSpec("tanh", _tanh, def_alpha=0.0, def_gain=1.0),
        ActivationSpec("sigmoid", _sigmoid, def_alpha=0.0, def_gain=1.0),
        ActivationSpec("elu", _elu, def_alpha=0.0, def_gain=1.0),
        ActivationSpec("selu", _selu, def_alpha=0.0, def_gain=1.0),
        ActivationSpec("softplus", _softplus, def_alpha=0.0, def_gain=1.0),
        ActivationSpec("swish", _swish, def_alpha=0.0, def_gain=_SQRT2),
    )
}


def bias_act_ref(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
) -> torch.Tensor:
    """Reference bias_act on checked arguments with resolved defaults (also the fused ops' fallback)."""
    spec = ACTIVATIONS[act]
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-float(clamp), float(clamp))
    return x
