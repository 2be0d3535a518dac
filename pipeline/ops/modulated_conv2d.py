"""StyleGAN2's modulated convolution (`modulated_conv2d`), NVlabs-compatible, split into replaceable parts.

For sample n, output channel o, input channel i and kernel tap k, with styles s [N, I] and weight w [O, I, kh, kw]:

    modulation:    w'[n,o,i,k] = w[o,i,k] * s[n,i]
    demodulation:  d[n,o]      = rsqrt( sum_{i,k} w'[n,o,i,k]^2 + 1e-8 ) = rsqrt( sum_i s[n,i]^2 q[o,i] + 1e-8 ),
                                 q[o,i] = sum_k w[o,i,k]^2
    output:        y[n]        = conv2d_resample(x[n], w'[n] * d[n]) + noise

Two equivalent schedules: fused (per-sample weights w' * d, batch folded into the groups of one grouped
convolution) and non-fused (x * s, a shared convolution with w, then * d, + noise), which is cheaper when the
batch is large relative to the channel count. With fp16 activations and demodulation, w and s are first
scaled by 1 / (sqrt(I kh kw) max|w[o]|) and 1 / max|s[n]| so that intermediate fp16 sums cannot overflow;
demodulation removes those scales again.

Beyond NVIDIA's signature, the layer's bias and activation can be handed in (`bias`, `act`, `alpha`, `gain`,
`clamp`): the result is then `bias_act(modulated_conv2d(...), bias, act=act, alpha=alpha, gain=gain,
clamp=clamp)`, the composition every StyleGAN layer computes, which lets a backend fuse it.

With impl='triton' the convolution stays with cuDNN (through `conv2d_resample`, whose FIR steps run the fused
upfirdn2d). In the non-fused schedule (the one training uses) the input modulation x * s is one pass of the
`ganpipe::scale_bias_act` kernel and the whole epilogue clamp(act(y * d + noise + b) * gain) is another, where
the reference makes five or six passes over the layer's largest tensor. The demodulation coefficients are a
[N, I] x [I, O] product: cuBLAS, not a custom kernel.
"""

from __future__ import annotations

import math

import torch

from pipeline.ops._custom_ops import scale, scale_bias_act_op
from pipeline.ops._dispatch import exporting, resolve_impl
from pipeline.ops.bias_act import ACTIVATIONS, bias_act
from pipeline.ops.conv2d_resample import conv2d_resample
from pipeline.ops.upfirdn2d import Padding

DEMOD_EPS = 1e-8


def prenormalize_fp16(weight: torch.Tensor, styles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale weight [O, I, kh, kw] by 1 / (sqrt(I kh kw) max_{i,k} |w[o]|) and styles [N, I] by 1 / max_i |s[n]|.

    Used before demodulation with fp16 activations: demodulation cancels both scales, overflow is avoided.
    """
    _, in_channels, kh, kw = weight.shape
    weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.abs().amax(dim=(1, 2, 3), keepdim=True))
    styles = styles / styles.abs().amax(dim=1, keepdim=True)
    return weight, styles


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor, eps: float = DEMOD_EPS) -> torch.Tensor:
    """d[n, o] = rsqrt(sum_{i,k} (w[o,i,k] s[n,i])^2 + eps), computed as rsqrt(s^2 @ q^T + eps) without
    materializing the per-sample weights. weight [O, I, kh, kw], styles [N, I] -> [N, O]."""
    q = weight.square().sum(dim=(2, 3))  # [O, I]
    return (styles.square() @ q.t() + eps).rsqrt()


def modulated_weight(weight: torch.Tensor, styles: torch.Tensor, dcoefs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weights w[o,i,k] * s[n,i] (* d[n,o] when dcoefs is given): [O,I,kh,kw], [N,I] -> [N,O,I,kh,kw]."""
    w = weight.unsqueeze(0) * styles.reshape(styles.shape[0], 1, -1, 1, 1)
    if dcoefs is not None:
        w = w * dcoefs.reshape(dcoefs.shape[0], -1, 1, 1, 1)
    return w


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
    impl: str = "auto",
    *,
    bias: torch.Tensor | None = None,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """Modulated (and by default demodulated) convolution with optional up/downsampling and additive noise.

    x [N, I, H, W], weight [O, I, kh, kw], styles [N, I], noise broadcastable to the output (e.g. [N, 1, H', W'])
    or None. up/down/padding/resample_filter/flip_weight as in `conv2d_resample`. fused_modconv: one grouped
    convolution with per-sample weights (True) or activation scaling around a shared convolution (False); the
    same numbers either way. An exported program always scales activations: a grouped convolution's group count is
    a constant of the graph, which would fix the batch size.
    bias [O], act, alpha, gain, clamp: an epilogue as in `bias_act` (the defaults add nothing).
    Returns [N, O, H', W'] in x's dtype.
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4, "x must be a [N, I, H, W] tensor"
    assert isinstance(weight, torch.Tensor) and weight.ndim == 4, "weight must be a [O, I, kh, kw] tensor"
    assert isinstance(styles, torch.Tensor) and styles.ndim == 2, "styles must be a [N, I] tensor"
    batch_size = x.shape[0]  # not int(): a traced batch (torch.export, ONNX, torch.compile) stays symbolic
    out_channels, in_channels, kh, kw = (int(s) for s in weight.shape)
    assert x.shape[1] == in_channels, f"x has {x.shape[1]} channels, weight expects {in_channels}"
    assert tuple(styles.shape) == (batch_size, in_channels), f"styles must be [{batch_size}, {in_channels}]"
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    assert bias is None or tuple(bias.shape) == (out_channels,), f"bias must have shape [{out_channels}]"
    impl = resolve_impl(impl, x)
    fused_modconv = fused_modconv and not exporting()

    if x.dtype == torch.float16 and demodulate:
        weight, styles = prenormalize_fp16(weight, styles)
    dcoefs = demodulation_coefficients(weight, styles) if demodulate else None

    if not fused_modconv:
        fused_epilogue = impl == "triton"
        x = scale(x, styles.to(x.dtype)) if fused_epilogue else x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(
            x,
            weight.to(x.dtype),
            f=resample_filter,
            up=up,
            down=down,
            padding=padding,
            flip_weight=flip_weight,
            impl=impl,
        )
        if fused_epilogue:
            spec = ACTIVATIONS[act]
            return scale_bias_act_op(
                x,
                dcoefs.to(x.dtype) if dcoefs is not None else x.new_ones(batch_size, x.shape[1]),
                None if noise is None else noise.to(x.dtype),
                None if bias is None else bias.to(x.dtype),
                act,
                float(spec.def_alpha if alpha is None else alpha),
                float(spec.def_gain if gain is None else gain),
                -1.0 if clamp is None else float(clamp),
            )
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return _epilogue(x, bias, act, alpha, gain, clamp, impl)

    w = modulated_weight(weight, styles, dcoefs)  # [N, O, I, kh, kw]
    y = conv2d_resample(
        x.reshape(1, batch_size * in_channels, *x.shape[2:]),
        w.reshape(batch_size * out_channels, in_channels, kh, kw).to(x.dtype),
        f=resample_filter,
        up=up,
        down=down,
        padding=padding,
        groups=batch_size,
        flip_weight=flip_weight,
        impl=impl,
    )
    y = y.reshape(batch_size, out_channels, *y.shape[2:])
    if noise is not None:
        y = y + noise.to(y.dtype)
    return _epilogue(y, bias, act, alpha, gain, clamp, impl)


def _epilogue(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    alpha: float | None,
    gain: float | None,
    clamp: float | None,
    impl: str,
) -> torch.Tensor:
    if bias is None and act == "linear" and gain is None and clamp is None:
        return x
    return bias_act(x, None if bias is None else bias.to(x.dtype), act=act, alpha=alpha, gain=gain, clamp=clamp,
                    impl=impl)  # fmt: skip
