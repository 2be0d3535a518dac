"""Bias + activation + gain + clamp in one op (`bias_act`), NVlabs-compatible, with the activation table.

    y = clamp( act(x + b[broadcast along dim], alpha) * gain, -clamp, +clamp )

Each step is optional: b=None adds nothing, act='linear' is the identity, gain=None means the activation's
default gain (`ACTIVATIONS[act].def_gain`, e.g. sqrt(2) for relu/lrelu/swish so that unit-variance inputs keep
roughly unit variance), alpha=None means its default shape parameter (0.2 for lrelu; the others ignore
alpha), clamp=None disables clamping. The reference is a composition of differentiable torch ops, so it
supports gradients of any order (relu/lrelu/clamp have zero second derivatives almost everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.ops._dispatch import resolve_impl


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


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """y = clamp(act(x + b, alpha) * gain, -clamp, clamp); returns a tensor of x's shape and dtype.

    x: any shape. b: 1-D bias of length x.shape[dim] (ignored dim when None). act: a key of `ACTIVATIONS`.
    alpha / gain: None = the activation's `def_alpha` / `def_gain`. clamp: None = no clamping, else >= 0.
    """
    assert isinstance(x, torch.Tensor), "x must be a tensor"
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    assert clamp is None or clamp >= 0, "clamp must be None or >= 0"
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.ndim == 1, "b must be a 1-D tensor"
        assert 0 <= dim < x.ndim, f"dim must be in [0, {x.ndim}), got {dim}"
        assert b.shape[0] == x.shape[dim], f"b has {b.shape[0]} elements, x.shape[{dim}] is {x.shape[dim]}"
    spec = ACTIVATIONS[act]
    alpha = float(spec.def_alpha if alpha is None else alpha)
    gain = float(spec.def_gain if gain is None else gain)
    if resolve_impl(impl, x) == "triton":
        return _bias_act_triton(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
    return _bias_act_ref(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)


def _bias_act_triton(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
) -> torch.Tensor:
    """The fused path on checked arguments with resolved defaults: the `ganpipe::bias_act` custom op."""
    from pipeline.ops._custom_ops import bias_act_op

    assert x.is_floating_point(), "x must be a floating-point tensor"
    if b is None:
        dim = min(max(dim, 0), max(x.ndim - 1, 0))  # unused without a bias; any valid axis will do
    elif b.dtype != x.dtype:  # the reference's x + b promotes: same result dtype here
        dtype = torch.promote_types(x.dtype, b.dtype)
        x, b = x.to(dtype), b.to(dtype)
    return bias_act_op(x, b, dim, act, alpha, gain, -1.0 if clamp is None else float(clamp))


def _bias_act_ref(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
) -> torch.Tensor:
    """The reference on checked arguments with resolved defaults (also the fused ops' fallback)."""
    spec = ACTIVATIONS[act]
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-float(clamp), float(clamp))
    return x
