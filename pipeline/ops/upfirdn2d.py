"""Upsample, FIR-filter, downsample a batch of 2-D images (`upfirdn2d`) and its helpers, NVlabs-compatible.

For every channel of x [N, C, H, W], with integer factors up = (ux, uy), down = (dx, dy), padding
(px0, px1, py0, py1) and filter f [fh, fw] (a 1-D filter g of t taps stands for the separable f = g g^T):

    1. zero insertion:  u[i*uy, j*ux] = x[i, j], all other samples 0           -> [H*uy, W*ux]
    2. pad / crop:      p = u padded by px0, px1, py0, py1 zeros (negative values crop)
    3. FIR filter:      v[i, j] = sum_{a,b} p[i + a, j + b] * f'[a, b]          ("valid" positions only)
                        where f' = flip(f) (true convolution with f) unless flip_filter (then correlation),
                        scaled by gain ** (f.ndim / 2), so the overall signal gain is `gain` either way
    4. downsample:      y[i, j] = v[i*dy, j*dx]

    output size: H_out = (H*uy + py0 + py1 - fh) // dy + 1, W_out likewise.

`setup_filter` prepares f (normalize to unit DC gain, separable or outer product, flip, gain); `filter2d`,
`upsample2d`, `downsample2d` choose the padding that keeps the image centred and its size a multiple/fraction
of the input. The reference (`_ref.upfirdn2d_ref`, with the argument parsers re-exported here) is a composition
of differentiable torch ops (pad, depthwise strided conv2d), so it supports gradients of any order with respect
to x. The filter is a constant: it must not require grad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.ops._custom_ops import upfirdn2d_op
from pipeline.ops._dispatch import resolve_impl
from pipeline.ops._ref import Padding, Scaling, filter_size, parse_padding, parse_scaling, upfirdn2d_ref


def setup_filter(
    f: torch.Tensor | Sequence | float | None,
    device: torch.device = torch.device("cpu"),  # noqa: B008 - NVlabs' signature
    normalize: bool = True,
    flip_filter: bool = False,
    gain: float = 1,
    separable: bool | None = None,
) -> torch.Tensor:
    """Prepare a float32 FIR filter for `upfirdn2d`.

    f: None (identity), a scalar (impulse), 1-D taps [t] or a 2-D filter [fh, fw]. A 1-D filter stays 1-D
    (separable: applied along x, then along y) when `separable` is True, or when it is None and the filter has
    at least 8 taps; otherwise it becomes the outer product g g^T. Then, in order: divide by the sum (if
    `normalize`), flip along every axis (if `flip_filter`), multiply by gain ** (ndim / 2), so the separable
    and the 2-D forms carry the same overall gain. Never modifies the caller's tensor.
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32).clone()
    assert f.ndim in (0, 1, 2) and f.numel() > 0, f"filter must be a scalar, 1-D or 2-D, got shape {list(f.shape)}"
    if f.ndim == 0:
        f = f.reshape(1)
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    assert f.ndim == (1 if separable else 2), "a 2-D filter cannot be made separable"
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 1,
    down: Scaling = 1,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """Zero-insertion upsample by `up`, pad by `padding`, FIR-filter with `f`, keep every `down`-th sample.

    x: [N, C, H, W] (float16/32/64). f: prepared filter ([fh, fw], separable [t], or None = identity).
    Padding is in upsampled pixels; negative values crop. flip_filter: False = convolution with f,
    True = correlation. Output: [N, C, (H*uy + py0 + py1 - fh) // dy + 1, (W*ux + px0 + px1 - fw) // dx + 1].
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4, "x must be a [N, C, H, W] tensor"
    if f is not None:
        assert isinstance(f, torch.Tensor) and f.ndim in (1, 2), "filter must be a 1-D or 2-D tensor (or None)"
        assert f.is_floating_point() and not f.requires_grad, "filter must be a constant floating-point tensor"
    up, down, padding = parse_scaling(up), parse_scaling(down), parse_padding(padding)
    (ux, uy), (px0, px1, py0, py1), (fw, fh) = up, padding, filter_size(f)
    h, w = x.shape[2], x.shape[3]
    assert w * ux + px0 + px1 >= fw and h * uy + py0 + py1 >= fh, "padded, upsampled image is smaller than the filter"
    if resolve_impl(impl, x) == "triton":
        return _upfirdn2d_triton(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    return upfirdn2d_ref(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)


def correlation_kernel(
    f: torch.Tensor | None, flip_filter: bool, gain: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The 2-D correlation kernel k [fh, fw] that the fused op slides over the padded image: the outer product
    of a separable filter (each axis carries gain ** (1/2), so k carries `gain`), flipped unless flip_filter
    (upfirdn2d convolves with f), times gain. float64 for float64 inputs, float32 otherwise."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if f is None:
        return torch.full((1, 1), float(gain), dtype=acc, device=device)
    k = f.to(device=device, dtype=acc)
    k = torch.outer(k, k) if k.ndim == 1 else k
    if not flip_filter:
        k = k.flip([0, 1])
    return k * gain if gain != 1 else k


def _upfirdn2d_triton(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: tuple[int, int],
    down: tuple[int, int],
    padding: tuple[int, int, int, int],
    flip_filter: bool,
    gain: float,
) -> torch.Tensor:
    """The fused path on checked, parsed arguments: the `ganpipe::upfirdn2d` custom op."""
    assert x.is_floating_point(), "x must be a floating-point tensor"
    k = correlation_kernel(f, flip_filter, gain, x.dtype, x.device)
    return upfirdn2d_op(x, k, *up, *down, *padding)


def filter2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """FIR-filter x with f, padded so the output has the input's size (plus `padding`, in output pixels).

    The filter's centre is at index fw // 2 (fh // 2): padding fw // 2 before and (fw - 1) // 2 after.
    """
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    pad = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """Upsample x by `up` with the interpolation filter f; output is [N, C, H*uy, W*ux] (plus `padding`).

    Zero insertion divides the DC level by ux*uy, so the filter runs with gain * ux * uy; the padding
    (fw + ux - 1) // 2 before and (fw - ux) // 2 after keeps the upsampled image centred.
    """
    ux, uy = parse_scaling(up)
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    pad = [px0 + (fw + ux - 1) // 2, px1 + (fw - ux) // 2, py0 + (fh + uy - 1) // 2, py1 + (fh - uy) // 2]
    return upfirdn2d(x, f, up=up, padding=pad, flip_filter=flip_filter, gain=gain * ux * uy, impl=impl)


def downsample2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    down: Scaling = 2,
    padding: Padding = 0,
    flip_filter: bool = False,
    gain: float = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """Low-pass x with f and keep every `down`-th sample; output is [N, C, H // dy, W // dx].

    Padding (fw - dx + 1) // 2 before and (fw - dx) // 2 after keeps the downsampled image centred; the
    user's `padding` is added to it, i.e. it counts input pixels (before downsampling).
    """
    dx, dy = parse_scaling(down)
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    pad = [px0 + (fw - dx + 1) // 2, px1 + (fw - dx) // 2, py0 + (fh - dy + 1) // 2, py1 + (fh - dy) // 2]
    return upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)
