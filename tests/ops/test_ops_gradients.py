"""First and second derivatives of every op in float64 (R1 and path-length regularisation need both)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from pipeline.ops import bias_act, conv2d_resample, modulated_conv2d, setup_filter, upfirdn2d

F4 = setup_filter([1, 3, 3, 1])
F4_SEP = setup_filter([1, 3, 3, 1], separable=True)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def _check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("f", [F4, F4_SEP], ids=["2d", "separable"])
@pytest.mark.parametrize(
    "kwargs", [dict(up=2, padding=(2, 1)), dict(down=2, padding=1), dict(up=2, down=2, padding=-1)]
)
def test_upfirdn2d(f, kwargs):
    x = _rand(1, 2, 5, 4)
    _check(lambda x: upfirdn2d(x, f, gain=1.5, **kwargs), (x,))


def test_bias_act_lrelu_with_inactive_clamp():
    b = _rand(3, seed=1)
    target = _rand(2, 3, 4, seed=2).detach()
    target = target.sign() * (target.abs() + 0.1)  # keep x + b away from the kink at 0
    x = (target - b.detach().reshape(1, 3, 1)).requires_grad_()
    _check(lambda x, b: bias_act(x, b, act="lrelu", clamp=100.0), (x, b))


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "elu", "selu", "softplus", "swish"])
def test_bias_act_smooth_activations(act):
    _check(lambda x, b: bias_act(x, b, dim=0, act=act, gain=0.7), (_rand(3, 4), _rand(3, seed=1)))


@pytest.mark.parametrize("updown", [(2, 1), (1, 2)])
def test_conv2d_resample(updown):
    up, down = updown
    _check(
        lambda x, w: conv2d_resample(x, w, F4, up=up, down=down, padding=1, groups=2),
        (_rand(1, 4, 4, 4), _rand(2, 2, 3, 3, seed=1)),
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("up", [1, 2])
def test_modulated_conv2d(fused, up):
    h = 4 * up
    inputs = (_rand(2, 2, 4, 4), _rand(2, 2, 3, 3, seed=1), _rand(2, 2, seed=2), _rand(2, 1, h, h, seed=3))

    def fn(x, w, s, noise):
        return modulated_conv2d(
            x, w, s + 2, noise=noise, up=up, padding=1, resample_filter=F4, flip_weight=(up == 1), fused_modconv=fused
        )

    _check(fn, inputs)


def test_r1_style_double_backward_reaches_weights():
    """d/dw of ||d out / d x||^2 is non-zero and matches between fused and non-fused paths."""
    x, w, s = _rand(2, 3, 5, 5), _rand(4, 3, 3, 3, seed=1), _rand(2, 3, seed=2)
    grads = []
    for fused in (True, False):
        y = modulated_conv2d(x, w, s, padding=1, fused_modconv=fused)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), w)
        assert gw.abs().sum() > 0
        grads.append(gw)
    torch.testing.assert_close(grads[0], grads[1])
