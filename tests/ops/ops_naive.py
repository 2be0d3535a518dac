"""Independent, deliberately naive formulations of the ops, written from their definitions (no conv2d for the
FIR filter, explicit index assignment for zero insertion, explicit zero canvases for padding), used as the
ground truth in tests/ops. Slow; only for tiny tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def as_pad4(p):
    if isinstance(p, int):
        return p, p, p, p
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    return tuple(p)


def full_filter(f: torch.Tensor | None) -> torch.Tensor:
    """The 2-D filter a prepared filter stands for: 1-D taps g mean g g^T (so each axis carries g)."""
    if f is None:
        return torch.ones(1, 1, dtype=torch.float64)
    f = f.double()
    return torch.outer(f, f) if f.ndim == 1 else f


def naive_pad(x: torch.Tensor, px0: int, px1: int, py0: int, py1: int) -> torch.Tensor:
    """Place x on a zero canvas grown by the positive amounts, then cut away the negative amounts."""
    n, c, h, w = x.shape
    canvas = x.new_zeros(n, c, h + max(py0, 0) + max(py1, 0), w + max(px0, 0) + max(px1, 0))
    canvas[:, :, max(py0, 0) : max(py0, 0) + h, max(px0, 0) : max(px0, 0) + w] = x
    return canvas[:, :, max(-py0, 0) : canvas.shape[2] - max(-py1, 0), max(-px0, 0) : canvas.shape[3] - max(-px1, 0)]


def naive_fir(x: torch.Tensor, f2: torch.Tensor, flip_filter: bool) -> torch.Tensor:
    """'valid' 2-D FIR: true convolution with f2 (or correlation when flip_filter), as a sum of shifted slices."""
    fh, fw = f2.shape
    oh, ow = x.shape[2] - fh + 1, x.shape[3] - fw + 1
    out = x.new_zeros(x.shape[0], x.shape[1], oh, ow)
    for a in range(fh):
        for b in range(fw):
            tap = f2[a, b] if flip_filter else f2[fh - 1 - a, fw - 1 - b]
            out = out + x[:, :, a : a + oh, b : b + ow] * tap
    return out


def naive_upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    ux, uy = as_pair(up)
    dx, dy = as_pair(down)
    px0, px1, py0, py1 = as_pad4(padding)
    x = x.double()
    n, c, h, w = x.shape
    u = x.new_zeros(n, c, h * uy, w * ux)
    u[:, :, ::uy, ::ux] = x
    p = naive_pad(u, px0, px1, py0, py1)
    v = naive_fir(p, full_filter(f) * gain, flip_filter)
    return v[:, :, ::dy, ::dx]


def naive_conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False):
    """From the definition: zero-insert, pad once (user padding + the centring of upsample2d/downsample2d),
    convolve with w, FIR with f (gain up**2 after upsampling; f applied once more when also downsampling),
    keep every down-th sample."""
    x = x.double()
    w = w.double()
    f2 = full_filter(f)
    fh, fw = f2.shape
    px0, px1, py0, py1 = as_pad4(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    n, c, h, wd = x.shape
    u = x.new_zeros(n, c, h * up, wd * up)
    u[:, :, ::up, ::up] = x
    p = naive_pad(u, px0, px1, py0, py1)
    y = F.conv2d(p, w if flip_weight else w.flip([2, 3]), groups=groups)
    if up > 1:
        y = naive_fir(y, f2 * up**2, flip_filter)
    if down > 1:
        y = naive_fir(y, f2, flip_filter)[:, :, ::down, ::down]
    return y


def naive_modulated_conv2d(
    x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None, demodulate=True, flip_weight=True
):
    """One sample at a time with explicitly built per-sample weights."""
    outs = []
    for i in range(x.shape[0]):
        wi = weight.double() * styles[i].double().reshape(1, -1, 1, 1)
        if demodulate:
            wi = wi / torch.sqrt((wi**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        outs.append(naive_conv2d_resample(x[i : i + 1], wi, resample_filter, up, down, padding, 1, flip_weight))
    y = torch.cat(outs)
    return y + noise.double() if noise is not None else y
