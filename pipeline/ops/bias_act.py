"""Bias + activation + gain + clamp in one op (`bias_act`), NVlabs-compatible, and the activation table
(`ACTIVATIONS` of `ActivationSpec`, defined next to the reference in `_ref.py` and re-exported here).

    y = clamp( act(x + b[broadcast along dim], alpha) * gain, -clamp, +clamp )

Each step is optional: b=None adds nothing, act='linear' is the identity, gain=None means the activation's
default gain (`ACTIVATIONS[act].def_gain`, e.g. sqrt(2) for relu/lrelu/swish so that unit-variance inputs keep
roughly unit variance), alpha=None means its default shape parameter (0.2 for lrelu; the others ignore
alpha), clamp=None disables clamping. The reference (`_ref.bias_act_ref`) is a composition of differentiable
torch ops, so it supports gradients of any order (relu/lrelu/clamp have zero second derivatives almost
everywhere).
"""

from __future__ import annotations

import torch

from pipeline.ops._custom_ops import bias_act_op
from pipeline.ops._dispatch import resolve_impl
from pipeline.ops._ref import ACTIVATIONS, ActivationSpec, bias_act_ref

__all__ = ["ACTIVATIONS", "ActivationSpec", "bias_act"]  # the table and its type live in _ref, re-exported here


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
    return bias_act_ref(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)


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
    assert x.is_floating_point(), "x must be a floating-point tensor"
    if b is None:
        dim = min(max(dim, 0), max(x.ndim - 1, 0))  # unused without a bias; any valid axis will do
    elif b.dtype != x.dtype:  # the reference's x + b promotes: same result dtype here
        dtype = torch.promote_types(x.dtype, b.dtype)
        x, b = x.to(dtype), b.to(dtype)
    return bias_act_op(x, b, dim, act, alpha, gain, -1.0 if clamp is None else float(clamp))
