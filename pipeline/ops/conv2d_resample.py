"""2-D convolution with FIR up/downsampling (`conv2d_resample`), NVlabs-compatible, so official weights match.

Meaning (the order a naive implementation would use; padding happens once, in upsampled pixels):

    y = downsample_d( FIR_f( conv_w( pad_p( zero_insert_u(x) ) ) ) )     with the FIR gain u**2 when u > 1

where conv_w is correlation with w (flip_weight=True, what F.conv2d does) or true convolution
(flip_weight=False), FIR_f is `upfirdn2d`'s filter (true convolution unless flip_filter) and, as in NVlabs,
the padding grows by the centring amounts of `upsample2d` (when up > 1) and of `downsample2d` (when
down > 1); with both, f is applied twice. Because conv_w and FIR_f are linear and shift-invariant they
commute, which the cheaper schedules below use (each gives the same result up to rounding):

    up = down = 1:  F.conv2d (padding passed to it when symmetric and >= 0, else pad first)
    1x1, down only: filter + downsample first, then the 1x1 conv on the small image
    1x1, up only:   the 1x1 conv first, then upsample + filter
    down only:      filter, then a conv with stride `down`
    up (+ down):    conv_transpose2d with stride `up` (zero insertion and conv in one), then filter
                    (and, when down > 1, one more filter + downsample)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.ops._dispatch import resolve_impl
from pipeline.ops.upfirdn2d import Padding, filter_size, parse_padding, upfirdn2d


def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int = 1,
    padding: tuple[int, int] = (0, 0),
    groups: int = 1,
    transpose: bool = False,
    flip_weight: bool = True,
) -> torch.Tensor:
    """F.conv2d / F.conv_transpose2d; flip_weight=False flips the kernel so that the op is a true convolution."""
    if not flip_weight and (w.shape[2] > 1 or w.shape[3] > 1):
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _transpose_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[O, I/g, kh, kw] conv2d weight -> [I, O/g, kh, kw] conv_transpose2d weight with the same groups."""
    out_channels, in_per_group, kh, kw = w.shape
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    return w.reshape(groups * in_per_group, out_channels // groups, kh, kw)


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: Padding = 0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Convolve x [N, I, H, W] with w [O, I/groups, kh, kw], upsampling by `up` / downsampling by `down` with
    the prepared FIR filter f (None = identity). padding: int, (x, y) or (x0, x1, y0, y1), in upsampled
    pixels, applied once before the convolution. flip_weight: True = correlation (F.conv2d), False = true
    convolution. flip_filter: False = convolution with f, True = correlation. Returns [N, O, H', W'].
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4, "x must be a [N, C, H, W] tensor"
    assert isinstance(w, torch.Tensor) and w.ndim == 4 and w.dtype == x.dtype, "w must be 4-D with x's dtype"
    assert f is None or (isinstance(f, torch.Tensor) and f.ndim in (1, 2) and f.is_floating_point())
    assert isinstance(up, int) and up >= 1, "up must be an int >= 1"
    assert isinstance(down, int) and down >= 1, "down must be an int >= 1"
    assert isinstance(groups, int) and groups >= 1, "groups must be an int >= 1"
    out_channels, in_per_group, kh, kw = (int(s) for s in w.shape)
    assert x.shape[1] == in_per_group * groups, f"x has {x.shape[1]} channels, w expects {in_per_group * groups}"
    assert out_channels % groups == 0, "out_channels must be divisible by groups"
    impl = resolve_impl(impl, x)

    fw, fh = filter_size(f)
    px0, px1, py0, py1 = parse_padding(padding)
    if up > 1:  # centring of upsample2d
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:  # centring of downsample2d
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    pad = [px0, px1, py0, py1]
    one_by_one = kw == 1 and kh == 1

    if one_by_one and down > 1 and up == 1:
        x = upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter, impl=impl)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)

    if one_by_one and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=pad, gain=up**2, flip_filter=flip_filter, impl=impl)

    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, impl=impl)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    if up > 1:
        # conv_transpose2d(stride=up) = zero insertion (without the trailing up-1 zeros) + full convolution
        # with w, i.e. implicit padding kw-1 before and kw-1-(up-1) after; the rest of the requested padding
        # (or crop) is left to the filter step. A crop shared by both sides goes to conv_transpose2d itself.
        px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
        crop_x, crop_y = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = _conv(
            x,
            _transpose_weight(w, groups),
            stride=up,
            padding=(crop_y, crop_x),
            groups=groups,
            transpose=True,
            flip_weight=not flip_weight,  # conv_transpose2d convolves where conv2d correlates
        )
        pad = [px0 + crop_x, px1 + crop_x, py0 + crop_y, py1 + crop_y]
        x = upfirdn2d(x, f, padding=pad, gain=up**2, flip_filter=flip_filter, impl=impl)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter, impl=impl)
        return x

    # up == down == 1: let conv2d pad when it can, otherwise pad/crop first.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=(py0, px0), groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, None, padding=pad, impl=impl)
    return _conv(x, w, groups=groups, flip_weight=flip_weight)
