"""The fused Triton backend (run on CPU by Triton's interpreter) against the reference: values over a grid of
shapes, filters, factors, paddings, activations and layouts; first and second derivatives through the custom ops;
torch.compile tracing; the run-time fallback. Shapes are tiny: the interpreter executes each program in Python."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from ops_cases import DOWNS, FILTERS, PADDINGS, UPS
from torch.autograd import gradcheck, gradgradcheck

import pipeline.ops._dispatch as dispatch
from pipeline.ops import (
    ACTIVATIONS,
    OpsFallbackWarning,
    bias_act,
    conv2d_resample,
    downsample2d,
    filter2d,
    filtered_lrelu,
    modulated_conv2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)
from pipeline.ops._custom_ops import scale_bias_act_op
from pipeline.ops._dispatch import OpsBackendUnavailable
from pipeline.ops._tiles import kernel_limit
from pipeline.ops.upfirdn2d import filter_size, parse_padding

pytestmark = pytest.mark.usefixtures("interpreter")


FLIP_GAIN = [(False, 1.0), (True, 2.5)]


def _randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(actual, expected, dtype):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ upfirdn2d


@pytest.mark.parametrize("f", [f for _, f in FILTERS], ids=[name for name, _ in FILTERS])
def test_upfirdn2d_matches_reference(f):
    """All 16 up x down pairs per filter, the padding and (flip_filter, gain) cycling through their lists."""
    x = _randn(2, 3, 7, 6)
    checked = 0
    for i, (up, down) in enumerate(itertools.product(UPS, DOWNS)):
        padding = PADDINGS[i % len(PADDINGS)]
        flip_filter, gain = FLIP_GAIN[(i // len(PADDINGS)) % 2]
        kwargs = dict(up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
        try:
            expected = upfirdn2d(x, f, impl="ref", **kwargs)
        except AssertionError:  # too small for the filter: the fused path must refuse it the same way
            with pytest.raises(AssertionError):
                upfirdn2d(x, f, impl="triton", **kwargs)
            continue
        y = upfirdn2d(x, f, impl="triton", **kwargs)
        assert y.shape == expected.shape and y.dtype == x.dtype, kwargs
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10, msg=lambda m, kw=kwargs: f"{kw}: {m}")
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kwargs",
    [dict(up=2, padding=(2, 1)), dict(down=2, padding=(1, 1)), dict(up=2, down=2, padding=-1), dict(up=4)],
    ids=["up2", "down2", "up2down2crop", "up4"],
)
def test_upfirdn2d_low_precision_dtypes(kwargs, dtype):
    f = setup_filter([1, 3, 3, 1])
    x = _randn(2, 3, 9, 8).to(dtype)
    expected = upfirdn2d(x.double(), f, impl="ref", **kwargs).to(dtype)
    y = upfirdn2d(x, f, impl="triton", **kwargs)
    assert y.dtype == dtype
    _close(y.float(), expected.float(), torch.bfloat16 if dtype != torch.float32 else dtype)


def test_upfirdn2d_helpers_and_layouts():
    f = setup_filter([1, 3, 3, 1])
    x = _randn(2, 4, 6, 5, dtype=torch.float32)
    for fn in (filter2d, upsample2d, downsample2d):
        _close(fn(x, f, impl="triton"), fn(x, f, impl="ref"), torch.float32)
    channels_last = x.to(memory_format=torch.channels_last)
    _close(upsample2d(channels_last, f, impl="triton"), upsample2d(x, f, impl="ref"), torch.float32)
    strided = _randn(2, 4, 12, 10, dtype=torch.float32)[:, :, ::2, 1::2]  # non-contiguous view
    assert not strided.is_contiguous()
    _close(downsample2d(strided, f, impl="triton"), downsample2d(strided, f, impl="ref"), torch.float32)
    transposed = _randn(2, 4, 5, 6, dtype=torch.float32).transpose(2, 3)
    _close(filter2d(transposed, f, impl="triton"), filter2d(transposed, f, impl="ref"), torch.float32)


def test_upfirdn2d_large_plane_count_and_tiles():
    """More output rows/columns than one tile, odd sizes, many planes."""
    f = setup_filter([1, 3, 3, 1])
    x = _randn(3, 5, 21, 70, dtype=torch.float32)
    _close(upsample2d(x, f, impl="triton"), upsample2d(x, f, impl="ref"), torch.float32)
    _close(downsample2d(x, f, impl="triton"), downsample2d(x, f, impl="ref"), torch.float32)


# ------------------------------------------------------------------------------------------------- bias_act


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_bias_act_matches_reference(act):
    for dtype, (shape, dim), with_bias, (alpha, gain, clamp) in itertools.product(
        [torch.float64, torch.float32],
        [((2, 3, 5, 7), 1), ((6, 9), 1), ((4, 5, 3), 2), ((3, 40, 40), 0), ((2, 3, 33, 33), 1)],
        [True, False],
        [(None, None, None), (0.3, 1.7, 0.8), (None, 0.5, 0.0)],
    ):
        x = _randn(*shape, dtype=dtype) * 3
        b = _randn(shape[dim], dtype=dtype, seed=1) if with_bias else None
        kwargs = dict(dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
        y = bias_act(x, b, impl="triton", **kwargs)
        assert y.shape == x.shape and y.dtype == dtype
        _close(y, bias_act(x, b, impl="ref", **kwargs), dtype)


def test_bias_act_layouts_and_bf16():
    x = _randn(2, 8, 5, 6, dtype=torch.float32)
    b = _randn(8, dtype=torch.float32, seed=1)
    expected = bias_act(x, b, act="lrelu", clamp=1.0, impl="ref")
    _close(bias_act(x.to(memory_format=torch.channels_last), b, act="lrelu", clamp=1.0, impl="triton"), expected,
           torch.float32)  # fmt: skip
    strided = _randn(2, 8, 5, 12, dtype=torch.float32)[..., ::2]
    _close(
        bias_act(strided, b, act="swish", impl="triton"), bias_act(strided, b, act="swish", impl="ref"), torch.float32
    )
    xb, bb = x.bfloat16(), b.bfloat16()
    yb = bias_act(xb, bb, act="lrelu", impl="triton")
    assert yb.dtype == torch.bfloat16
    _close(yb.float(), bias_act(xb, bb, act="lrelu", impl="ref").float(), torch.bfloat16)


def test_bias_act_result_dtype_follows_reference_promotion():
    x = _randn(2, 3, 4, 4, dtype=torch.float32).bfloat16()
    for b in (_randn(3, dtype=torch.float32), _randn(3, dtype=torch.float64), _randn(3, dtype=torch.bfloat16)):
        ref, fused = bias_act(x, b, act="lrelu", impl="ref"), bias_act(x, b, act="lrelu", impl="triton")
        assert fused.dtype == ref.dtype
        torch.testing.assert_close(fused, ref, rtol=1e-2, atol=1e-2)


def test_bias_act_gradient_matches_reference_at_kinks_and_clamp():
    """Kinks and clamp boundaries follow torch (relu'(0) = 0, lrelu'(0) = alpha, clamp exclusive)."""
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 3.0]], dtype=torch.float64)
    for act, clamp in itertools.product(["relu", "lrelu", "linear", "elu"], [None, 1.0, 2.0]):
        grads = []
        for impl in ("ref", "triton"):
            xi = x.clone().requires_grad_()
            bias_act(xi, act=act, gain=1.0, clamp=clamp, impl=impl).sum().backward()
            grads.append(xi.grad)
        torch.testing.assert_close(grads[1], grads[0], msg=f"{act} clamp={clamp}")


# --------------------------------------------------------------------------------------- derivatives (float64)


def _check_grads(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("f", [setup_filter([1, 3, 3, 1]), setup_filter([1, 2], separable=True)], ids=["2d4", "sep2"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(up=2, padding=(2, 1)), dict(down=2, padding=1), dict(up=(2, 1), down=(1, 2), padding=(-1, 2, 1, 0))],
    ids=["up", "down", "mixed"],
)
def test_upfirdn2d_first_and_second_derivatives(f, kwargs):
    x = _randn(1, 2, 5, 4).requires_grad_()
    _check_grads(lambda x: upfirdn2d(x, f, gain=1.5, impl="triton", **kwargs), (x,))


def test_upfirdn2d_backward_equals_reference_backward():
    f = setup_filter([1, 3, 3, 1])
    x = _randn(2, 2, 6, 5)
    for kwargs in [dict(up=2, padding=(2, 1, 0, 3)), dict(down=2, padding=(1, 2, 2, 1)), dict(up=4, down=2)]:
        grads = []
        for impl in ("ref", "triton"):
            xi = x.clone().requires_grad_()
            y = upfirdn2d(xi, f, impl=impl, **kwargs)
            (g,) = torch.autograd.grad((y * _randn(*y.shape, seed=3)).sum(), xi)
            grads.append(g)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_bias_act_first_and_second_derivatives(act):
    b = _randn(3, seed=1).requires_grad_()
    target = _randn(2, 3, 4, seed=2)
    target = target.sign() * (target.abs() + 0.1)  # keep x + b away from the kinks at 0
    x = (target - b.detach().reshape(1, 3, 1)).requires_grad_()
    _check_grads(lambda x, b: bias_act(x, b, act=act, clamp=100.0, impl="triton"), (x, b))


def test_bias_act_second_derivative_with_active_clamp():
    x = (_randn(2, 3, 4) * 2).requires_grad_()
    _check_grads(lambda x: bias_act(x, act="tanh", gain=3.0, clamp=1.5, impl="triton"), (x,))


def test_modulated_conv2d_derivatives_through_fused_epilogue():
    x = _randn(2, 3, 4, 4).requires_grad_()
    w = _randn(2, 3, 3, 3, seed=1).requires_grad_()
    s = (_randn(2, 3, seed=2) + 2).requires_grad_()
    noise = _randn(2, 1, 4, 4, seed=3).requires_grad_()

    b = _randn(2, seed=4).requires_grad_()

    def fn(x, w, s, noise, b):
        return modulated_conv2d(
            x, w, s, noise=noise, padding=1, fused_modconv=False, impl="triton", bias=b, act="lrelu", clamp=1.0
        )

    _check_grads(fn, (x, w, s, noise, b))


def test_filtered_lrelu_derivatives():
    fu = setup_filter([1, 3, 3, 1])
    fd = setup_filter([1, 3, 3, 1])
    x = _randn(1, 2, 4, 4).requires_grad_()
    b = _randn(2, seed=1).requires_grad_()
    _check_grads(lambda x, b: filtered_lrelu(x, fu, fd, b, up=2, down=2, padding=2, impl="triton"), (x, b))


# ------------------------------------------------------------------------------- composite ops and filtered_lrelu


EPILOGUES = {
    "none": {},
    "lrelu_clamp": dict(act="lrelu", gain=math.sqrt(2), clamp=0.7),
    "bias_tanh": dict(bias=_randn(4, seed=5), act="tanh", alpha=None, gain=1.5),
}


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("fused_modconv", [True, False])
@pytest.mark.parametrize("up", [1, 2])
def test_modulated_conv2d_matches_reference(fused_modconv, up, epilogue):
    f = setup_filter([1, 3, 3, 1])
    x, w, s = _randn(2, 3, 5, 5), _randn(4, 3, 3, 3, seed=1), _randn(2, 3, seed=2)
    noise = _randn(2, 1, 5 * up, 5 * up, seed=3)
    kwargs = dict(noise=noise, up=up, padding=1, resample_filter=f, flip_weight=up == 1, fused_modconv=fused_modconv)
    kwargs.update(EPILOGUES[epilogue])
    _close(modulated_conv2d(x, w, s, impl="triton", **kwargs), modulated_conv2d(x, w, s, impl="ref", **kwargs),
           torch.float64)  # fmt: skip
    const_noise = _randn(5 * up, 5 * up, seed=4)
    kwargs.update(noise=const_noise, fused_modconv=False)
    _close(modulated_conv2d(x, w, s, impl="triton", **kwargs), modulated_conv2d(x, w, s, impl="ref", **kwargs),
           torch.float64)  # fmt: skip


def test_conv2d_resample_matches_reference():
    f = setup_filter([1, 3, 3, 1])
    x, w = _randn(2, 3, 6, 6), _randn(4, 3, 3, 3, seed=1)
    for kwargs in [dict(up=2, padding=1), dict(down=2, padding=1), dict(padding=(1, 0, 2, -1)), dict(up=2, down=2)]:
        _close(conv2d_resample(x, w, f, impl="triton", **kwargs), conv2d_resample(x, w, f, impl="ref", **kwargs),
               torch.float64)  # fmt: skip


def _filtered_lrelu_by_definition(x, fu, fd, b, up, down, padding, gain, slope, clamp):
    """Steps 1-4 of the module docstring written out with plain torch ops and the reference upfirdn2d."""
    if b is not None:
        x = x + b.reshape(1, -1, 1, 1)
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up**2, impl="ref")
    x = torch.nn.functional.leaky_relu(x, slope) * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return upfirdn2d(x, fd, down=down, impl="ref")


@pytest.mark.parametrize(
    ("up", "down", "padding", "clamp"),
    [(1, 1, 1, None), (2, 2, (5, 4, 5, 4), 0.5), (2, 1, 3, None), (1, 2, (2, 1), 1.0)],
)
def test_filtered_lrelu(up, down, padding, clamp):
    fu = setup_filter([1, 3, 3, 1])
    fd = setup_filter([1, 2, 1], separable=True)
    x, b = _randn(2, 3, 6, 5), _randn(3, seed=1)
    expected = _filtered_lrelu_by_definition(x, fu, fd, b, up, down, padding, math.sqrt(2), 0.2, clamp)
    kw = dict(up=up, down=down, padding=padding, clamp=clamp)
    _close(filtered_lrelu(x, fu, fd, b, impl="ref", **kw), expected, torch.float64)
    _check_triton_filtered_lrelu(x, fu, fd, b, kw, expected)
    assert filtered_lrelu(x).shape == x.shape  # no filters, no resampling: a scaled leaky ReLU
    torch.testing.assert_close(filtered_lrelu(x, impl="triton"), torch.nn.functional.leaky_relu(x, 0.2) * math.sqrt(2))
    with pytest.raises(AssertionError, match="b must have shape"):
        filtered_lrelu(x, fu, fd, b[:2])


def _kaiser_lowpass(taps: int) -> torch.Tensor:
    t = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    return setup_filter(torch.sinc(t / 2) * torch.kaiser_window(taps, periodic=False, beta=6.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("fu_name", "fd_name"), [("sep4", "2d4"), ("2d6", "sep2"), ("none", "asym3x2"), ("asym1x4", "none"), ("k12", "k12")]
)
def test_filtered_lrelu_single_kernel_grid(fu_name, fd_name):
    """The one-kernel path against the definition over filters (1-D, 2-D, asymmetric, none, StyleGAN3's 12-tap
    lowpass), factors 1/2/4, paddings incl. negative, flip_filter, bias or not, clamp, and planes several tiles
    wide."""
    filters = dict(FILTERS) | {"k12": _kaiser_lowpass(12)}
    fu, fd = filters[fu_name], filters[fd_name]
    cases = [
        dict(up=1, down=1, padding=1, flip_filter=False, clamp=None, bias=True),
        dict(up=2, down=2, padding=(6, 5, 6, 5), flip_filter=True, clamp=0.6, bias=True),
        dict(up=4, down=2, padding=(3, -1, 0, 2), flip_filter=False, clamp=None, bias=False),
        dict(up=1, down=4, padding=(2, 1), flip_filter=False, clamp=1.0, bias=True),
        dict(up=2, down=1, padding=5, flip_filter=False, clamp=None, bias=True),
    ]
    checked = 0
    for kw in cases:
        x = _randn(2, 3, 11, 21 if kw["up"] >= 2 else 37)
        b = _randn(3, seed=1) if kw.pop("bias") else None
        (fw_u, fh_u), (fw_d, fh_d) = filter_size(fu), filter_size(fd)
        px0, px1, py0, py1 = parse_padding(kw["padding"])
        h, w = x.shape[2] * kw["up"] + py0 + py1, x.shape[3] * kw["up"] + px0 + px1
        if h < fh_u + fh_d - 1 or w < fw_u + fw_d - 1:
            continue  # this filter pair is too long for the case's padding
        expected = filtered_lrelu(x, fu, fd, b, impl="ref", **kw)
        checked += _check_triton_filtered_lrelu(x, fu, fd, b, kw, expected)
    assert checked >= 3


def _check_triton_filtered_lrelu(x, fu, fd, b, kw, expected) -> bool:
    """The kernel against `expected` in float64 and float32 where it takes the geometry; where it does not (tiles
    over its limit), the one-line refusal. Whether the kernel was checked."""
    (fw_u, fh_u), (fw_d, fh_d) = filter_size(fu), filter_size(fd)
    if kernel_limit(kw["up"], kw["down"], max(fw_u, fh_u), max(fw_d, fh_d)) is not None:
        with pytest.raises(OpsBackendUnavailable, match=r"kernel takes tiles up to 64x64; up=\d, down=\d with"):
            filtered_lrelu(x, fu, fd, b, impl="triton", **kw)  # its tiles would not fit in registers
        return False
    for dtype in (torch.float64, torch.float32):
        bd = None if b is None else b.to(dtype)
        _close(filtered_lrelu(x.to(dtype), fu, fd, bd, impl="triton", **kw), expected.to(dtype), dtype)
    return True


def test_filtered_lrelu_bf16_and_layouts():
    f = _kaiser_lowpass(12)
    x = _randn(2, 4, 20, 18, dtype=torch.float32)
    b = _randn(4, seed=1, dtype=torch.float32)
    expected = filtered_lrelu(x, f, f, b, up=2, down=2, padding=10, clamp=2.0, impl="ref")
    channels_last = x.to(memory_format=torch.channels_last)
    _close(filtered_lrelu(channels_last, f, f, b, up=2, down=2, padding=10, clamp=2.0, impl="triton"), expected,
           torch.float32)  # fmt: skip
    y16 = filtered_lrelu(x.bfloat16(), f, f, b.bfloat16(), up=2, down=2, padding=10, clamp=2.0, impl="triton")
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), expected, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------------------------- scale_bias_act


def _scale_bias_act_expected(x, s, noise, b, act, alpha, gain, clamp):
    z = x * s[:, :, None, None] + (0 if noise is None else noise)
    return bias_act(z, b, act=act, alpha=alpha, gain=gain, clamp=clamp, impl="ref")


@pytest.mark.parametrize(
    "shape", [(2, 3, 1, 1), (2, 3, 5, 7), (1, 2, 70, 70), (3, 40, 4, 4)], ids=["1x1", "5x7", "70x70", "4x4x40"]
)
def test_scale_bias_act_matches_reference(shape):
    """Plane sizes below, at and above one tile's columns; noise broadcast per pixel, per sample, or full."""
    n, c, h, w = shape
    for dtype, noise_shape, with_bias, (act, alpha, gain, clamp) in itertools.product(
        [torch.float64, torch.float32],
        [None, (1, 1, h, w), (n, 1, h, w), shape],
        [False, True],
        [("linear", 0.0, 1.0, None), ("lrelu", 0.2, math.sqrt(2), 0.5), ("tanh", 0.0, 2.0, None)],
    ):
        x = _randn(*shape, dtype=dtype)
        s = _randn(n, c, dtype=dtype, seed=1)
        noise = None if noise_shape is None else _randn(*noise_shape, dtype=dtype, seed=2)
        b = _randn(c, dtype=dtype, seed=3) if with_bias else None
        y = scale_bias_act_op(x, s, noise, b, act, alpha, gain, -1.0 if clamp is None else clamp)
        _close(y, _scale_bias_act_expected(x, s, noise, b, act, alpha, gain, clamp), dtype)


@pytest.mark.parametrize("act, clamp", [("linear", -1.0), ("lrelu", -1.0), ("lrelu", 0.8), ("swish", 1.5)])
def test_scale_bias_act_first_and_second_derivatives(act, clamp):
    x = _randn(2, 3, 3, 2).requires_grad_()
    s = _randn(2, 3, seed=1).requires_grad_()
    noise = _randn(2, 1, 3, 2, seed=2).requires_grad_()
    b = _randn(3, seed=3).requires_grad_()

    def fn(x, s, noise, b):
        return scale_bias_act_op(x, s, noise, b, act, 0.2, 1.4, clamp)

    assert gradcheck(fn, (x, s, noise, b))
    assert gradgradcheck(fn, (x, s, noise, b))


# ---------------------------------------------------------------------------------------- torch.compile, fallback


def test_custom_ops_pass_opcheck():
    """torch.library's own consistency checks: schema, fake tensor, autograd registration, AOT dispatch."""
    x = _randn(1, 2, 5, 4, dtype=torch.float32).requires_grad_()
    k = torch.rand(4, 4)
    torch.library.opcheck(torch.ops.ganpipe.upfirdn2d.default, (x, k, 2, 2, 1, 1, 2, 1, 2, 1))
    b = _randn(2, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.ganpipe.bias_act.default, (x, b, 1, "tanh", 0.0, 1.0, -1.0))
    dy = _randn(1, 2, 5, 4, dtype=torch.float32, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.ganpipe.bias_act_grad.default, (dy, x, b, 1, "swish", 0.0, 1.4, 2.0))
    s = _randn(1, 2, dtype=torch.float32).requires_grad_()
    noise = _randn(1, 1, 5, 4, dtype=torch.float32).requires_grad_()
    ky, kx = torch.rand(1, 4, dtype=torch.float32), torch.rand(1, 4, dtype=torch.float32)
    torch.library.opcheck(
        torch.ops.ganpipe.filtered_lrelu.default, (x, b, ky, kx, ky, kx, 2, 2, 3, 3, 3, 3, 1.4, 0.2, 2.0)
    )
    torch.library.opcheck(torch.ops.ganpipe.scale_bias_act.default, (x, s, noise, b, "lrelu", 0.2, 1.4, 2.0))


def test_torch_compile_fullgraph_synthesis_block():
    """A StyleGAN2 synthesis block (modulated convs, upsampling, bias_act, toRGB) traces without graph breaks and
    its compiled forward and backward match eager. aot_eager exercises dynamo, the fake kernels and AOT autograd
    without a C++ compile step; the custom ops themselves are opaque to Inductor as well."""
    from pipeline.models.stylegan2 import SynthesisBlock

    torch.manual_seed(0)
    block = SynthesisBlock(
        8, 8, w_dim=8, resolution=8, img_channels=3, is_last=True, architecture="skip", conv_clamp=256
    ).train()
    x = torch.randn(2, 8, 4, 4)
    img = torch.randn(2, 3, 4, 4)
    ws = torch.randn(2, block.num_conv + block.num_torgb, 8)

    def run(x, img, ws):
        return block(x, img, ws, noise_mode="const")

    import os

    os.environ[dispatch.ENV_VAR] = "triton"
    try:
        torch._dynamo.reset()
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
        out_c = compiled(x, img, ws.requires_grad_())
        (g_c,) = torch.autograd.grad(out_c[1].square().sum(), ws)
        out_e = run(x, img, ws)
        (g_e,) = torch.autograd.grad(out_e[1].square().sum(), ws)
    finally:
        del os.environ[dispatch.ENV_VAR]
        torch._dynamo.reset()
    torch.testing.assert_close(out_c[1], out_e[1])
    torch.testing.assert_close(g_c, g_e)


@pytest.fixture
def broken_kernels(monkeypatch):
    """upfirdn2d's and bias_act's Triton launchers raise (as a compile error on an unsupported GPU would)."""
    from pipeline.ops import _triton_kernels  # lazy like the package's own import: after TRITON_INTERPRET is set

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(_triton_kernels, "upfirdn2d", broken)
    monkeypatch.setattr(_triton_kernels, "bias_act", broken)


def test_triton_failure_falls_back_once(broken_kernels):
    """pytest.warns records the fallback warning even under the suite's error filter for OpsFallbackWarning."""
    f = setup_filter([1, 3, 3, 1])
    x = _randn(1, 2, 5, 5).requires_grad_()
    with pytest.warns(OpsFallbackWarning, match="simulated kernel failure") as caught:
        y = upsample2d(x, f, impl="triton")
        z = bias_act(y, act="lrelu", impl="triton")
        (g,) = torch.autograd.grad(z.sum(), x)  # the backward ops fall back too, silently
        y2 = upsample2d(x, f, impl="triton")
    ours = [w for w in caught if issubclass(w.category, OpsFallbackWarning)]
    assert len(ours) == 1
    torch.testing.assert_close(y, upsample2d(x, f, impl="ref"))
    torch.testing.assert_close(y2, y)
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(bias_act(upsample2d(xr, f, impl="ref"), act="lrelu", impl="ref").sum(), xr)
    torch.testing.assert_close(g, gr)


def test_triton_failure_is_an_error_under_the_error_filter_every_time(broken_kernels):
    """What the suite's filterwarnings entry relies on: with OpsFallbackWarning an error, every failing kernel call
    raises (the warning that raised does not count as shown, so the once-per-process flag stays armed), with the
    kernel's own error chained, and no reference result comes back in its place."""
    f = setup_filter([1, 3, 3, 1])
    x = _randn(1, 2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpsFallbackWarning)
        for _ in range(2):
            with pytest.raises(OpsFallbackWarning, match="simulated kernel failure") as err:
                upsample2d(x, f, impl="triton")
            assert isinstance(err.value.__context__, RuntimeError)
        with pytest.raises(OpsFallbackWarning, match="bias_act"):
            bias_act(x, act="lrelu", impl="triton")
    assert not dispatch._fallback_warned
