"""StyleGAN3's filtered leaky ReLU (`filtered_lrelu`), NVlabs-compatible signature and semantics.

For x [N, C, H, W], bias b [C], upsampling filter fu, downsampling filter fd (prepared by `setup_filter`):

    1. z = x + b[c]
    2. u = upfirdn2d(z, fu, up=up, padding=padding, gain=up**2)            (zero insertion divides DC by up^2)
    3. v = clamp(lrelu(u, slope) * gain, -clamp, clamp)
    4. y = upfirdn2d(v, fd, down=down)

Output size: W' = (W up + px0 + px1 - (fu_w - 1) - (fd_w - 1) + (down - 1)) // down, H' likewise. The
nonlinearity runs at the higher sampling rate so that its harmonics above the output Nyquist frequency are
filtered out before decimation (alias-free generator).

Backends: 'ref' composes the reference ops. 'triton' runs steps 1-4 as one kernel (`ganpipe::filtered_lrelu`)
that keeps the upsampled tile on chip: along each axis both FIR steps are banded matrices applied with tl.dot,
so a 2-D filter is handed to it as a separable factorization sum_r ky[r] outer kx[r] (rank 1 for a 1-D filter,
the kernel's rows otherwise). Its backward is written with the fused upfirdn2d and bias_act ops (the
upsampled pre-activation is recomputed, not stored), so it is differentiable twice.

The kernel's tiles (`filtered_lrelu_tiles`) grow with the filters and factors; it takes a call only when they
stay within MAX_BLOCK (64 x 64), where every variant fits a GPU's shared memory (A100: 163 KiB per block) and
keeps its values in registers (`pipeline.ops.aot` checks both; 128-wide X tiles spilled kilobytes per thread).
Longer filters or larger factors (e.g. up=1, down=4 with 12 taps: 128 x 256 tiles, 1 MiB in float64) run the
reference under impl='auto' and are refused in one line under impl='triton'.
"""

from __future__ import annotations

import math

import torch

from pipeline.ops._custom_ops import filtered_lrelu_op
from pipeline.ops._dispatch import resolve_impl
from pipeline.ops._tiles import kernel_limit
from pipeline.ops.bias_act import bias_act
from pipeline.ops.upfirdn2d import Padding, filter_size, parse_padding, upfirdn2d


def filtered_lrelu(
    x: torch.Tensor,
    fu: torch.Tensor | None = None,
    fd: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    gain: float = math.sqrt(2),
    slope: float = 0.2,
    clamp: float | None = None,
    flip_filter: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Bias, upsample by `up` with fu, leaky ReLU (slope, gain, clamp), downsample by `down` with fd.

    x: [N, C, H, W]; fu, fd: prepared float32 filters (1-D separable or 2-D) or None; b: [C] or None; padding in
    upsampled pixels: int, (x, y) or (x0, x1, y0, y1). Returns [N, C, H', W'] (see the module docstring).
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4, "x must be a [N, C, H, W] tensor"
    assert isinstance(up, int) and up >= 1, "up must be an int >= 1"
    assert isinstance(down, int) and down >= 1, "down must be an int >= 1"
    assert clamp is None or clamp >= 0, "clamp must be None or >= 0"
    assert slope >= 0 and gain > 0, "slope must be >= 0 and gain > 0"
    for name, f in (("fu", fu), ("fd", fd)):
        assert f is None or (isinstance(f, torch.Tensor) and f.ndim in (1, 2) and f.dtype == torch.float32), (
            f"{name} must be a 1-D or 2-D float32 filter (or None)"
        )
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.shape == (x.shape[1],), f"b must have shape [{x.shape[1]}]"
    n = x.shape[0]  # left symbolic: int() would pin the batch size of an exported graph
    c, h, w = (int(s) for s in x.shape[1:])
    fu_w, fu_h = filter_size(fu)
    fd_w, fd_h = filter_size(fd)
    impl = resolve_impl(impl, x, kernel_limit(up, down, max(fu_w, fu_h), max(fd_w, fd_h)))
    px0, px1, py0, py1 = parse_padding(padding)
    out_w = (w * up + px0 + px1 - (fu_w - 1) - (fd_w - 1) + (down - 1)) // down
    out_h = (h * up + py0 + py1 - (fu_h - 1) - (fd_h - 1) + (down - 1)) // down
    assert out_w >= 1 and out_h >= 1, "padding is too small for the filters: the output would be empty"

    if impl == "triton":
        return _filtered_lrelu_triton(x, fu, fd, b, up, down, (px0, px1, py0, py1), gain, slope, clamp, flip_filter)
    if b is not None:
        x = bias_act(x, b.to(x.dtype), impl=impl)
    x = upfirdn2d(x, fu, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter, impl=impl)
    x = bias_act(x, act="lrelu", alpha=slope, gain=gain, clamp=clamp, impl=impl)
    x = upfirdn2d(x, fd, down=down, flip_filter=flip_filter, impl=impl)
    assert tuple(x.shape) == (n, c, out_h, out_w), f"internal error: got {list(x.shape)}"
    return x


def separable_factors(
    f: torch.Tensor | None, flip_filter: bool, gain: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ky [R, fh], kx [R, fw]) with sum_r ky[r] outer kx[r] = the 2-D correlation kernel of `f` (flipped unless
    flip_filter, times gain; see `upfirdn2d.correlation_kernel`). A 1-D filter is rank 1; a 2-D one is split by
    rows (ky = identity), which is exact and needs no host-side decomposition."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if f is None:
        return torch.full((1, 1), float(gain), dtype=acc, device=device), torch.ones((1, 1), dtype=acc, device=device)
    k = f.to(device=device, dtype=acc)
    if not flip_filter:
        k = k.flip(list(range(k.ndim)))
    if k.ndim == 1:
        return (k * gain).unsqueeze(0), k.unsqueeze(0)
    return torch.eye(k.shape[0], dtype=acc, device=device), k * gain


def _filtered_lrelu_triton(
    x: torch.Tensor,
    fu: torch.Tensor | None,
    fd: torch.Tensor | None,
    b: torch.Tensor | None,
    up: int,
    down: int,
    pad: tuple[int, int, int, int],
    gain: float,
    slope: float,
    clamp: float | None,
    flip_filter: bool,
) -> torch.Tensor:
    kuy, kux = separable_factors(fu, flip_filter, up**2, x.dtype, x.device)
    kdy, kdx = separable_factors(fd, flip_filter, 1.0, x.dtype, x.device)
    return filtered_lrelu_op(
        x, None if b is None else b.to(x.dtype), kuy, kux, kdy, kdx, up, down, *pad, float(gain), float(slope),
        -1.0 if clamp is None else float(clamp),
    )  # fmt: skip
