"""The Triton backend as `torch.library` custom ops: `ganpipe::upfirdn2d`, `ganpipe::bias_act`,
`ganpipe::bias_act_grad` and `ganpipe::scale_bias_act`, each with a fake (meta) implementation for
`torch.compile` and an autograd formula built from custom ops again, so every derivative order runs through the
fused kernels:

    upfirdn2d(x; k, up, down, pad) is linear in x; its adjoint is an upfirdn2d of the output gradient with the
        kernel flipped, up and down swapped and the padding that maps the output grid back onto the input:
            pad' = (fw - 1 - px0,  W ux - W' dx + px0 - ux + 1,  fh - 1 - py0,  H uy - H' dy + py0 - uy + 1)
        (W', H' the forward's output size). Being linear, its own backward is the forward again.
    bias_act(x, b) = clamp(act(x + b) * gain): dx = bias_act_grad(dy, x, b), db = dx summed over all but `dim`.
    bias_act_grad(dy, x, b) = dy * act'(x + b) * gain * [|act(x + b) * gain| < clamp] is linear in dy (its
        gradient there is bias_act_grad again) and its gradient in x (and b) is dy * act''(x + b) * gain * mask,
        written with differentiable torch ops (zero for linear/relu/lrelu, whose act'' vanishes a.e.).
    scale_bias_act(x, s, noise, b) = bias_act(x * s + noise, b): with dz = bias_act_grad(dy, x * s + noise, b),
        dx = dz * s (the op again), ds = sum_hw(dz x), dnoise = dz summed to noise's shape, db = sum_nhw(dz).

The op arguments are the *normalized* problem (2-D correlation kernel with the gain folded in, explicit factors
and paddings; the activation by name with alpha and gain resolved, clamp < 0 meaning none), so that the public
wrappers in upfirdn2d.py / bias_act.py keep NVIDIA's signatures. Each op's eager implementation runs the Triton
kernel and, should it fail, the reference on the same normalized problem, with one warning per process.

Imports: `_dispatch` and `_ref` (the references and the activation table) at the top, never a public op module,
which import this one; `_triton_kernels` on the first fused call (`_kernels`; not a cycle: importing it imports
triton, and `triton.jit` reads TRITON_INTERPRET when the kernels are decorated, so a harness can still set it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.ops._dispatch import warn_fallback_once
from pipeline.ops._ref import ACTIVATIONS, SELU_ALPHA, SELU_SCALE, bias_act_ref, upfirdn2d_ref

Tensor = torch.Tensor


def _kernels():
    """The Triton kernel module, imported on the first fused call rather than at the top: not a cycle, but
    importing it imports triton and `triton.jit` reads TRITON_INTERPRET then, which a test harness may still set."""
    from pipeline.ops import _triton_kernels  # lazy on purpose (TRITON_INTERPRET), see the docstring

    return _triton_kernels


def _with_fallback(op: str, fused: Callable[[], Tensor], ref: Callable[[], Tensor]) -> Tensor:
    try:
        return fused()
    except Exception as err:
        warn_fallback_once(op, err)
        return ref()


def upfirdn2d_out_size(h: int, w: int, fh: int, fw: int, up_x: int, up_y: int, down_x: int, down_y: int,
                       pad: tuple[int, int, int, int]) -> tuple[int, int]:  # fmt: skip
    """(H', W') of upfirdn2d: (H uy + py0 + py1 - fh) // dy + 1 and likewise for W."""
    px0, px1, py0, py1 = pad
    return (h * up_y + py0 + py1 - fh) // down_y + 1, (w * up_x + px0 + px1 - fw) // down_x + 1


# ---------------------------------------------------------------------------------------------------- upfirdn2d


@torch.library.custom_op("ganpipe::upfirdn2d", mutates_args=())
def upfirdn2d_op(
    x: Tensor,
    k: Tensor,
    up_x: int,
    up_y: int,
    down_x: int,
    down_y: int,
    pad_x0: int,
    pad_x1: int,
    pad_y0: int,
    pad_y1: int,
) -> Tensor:
    """y[n,c,i,j] = sum_{a,b} k[a,b] * P[n,c, i*down_y + a, j*down_x + b], P = x zero-inserted by up, padded by pad.

    x [N, C, H, W]; k [fh, fw] a correlation kernel (gain folded in, float32 or float64). Returns a contiguous
    [N, C, H', W'] tensor in x's dtype."""
    pad = (pad_x0, pad_x1, pad_y0, pad_y1)

    def fused() -> Tensor:
        return _kernels().upfirdn2d(x, k, (up_x, up_y), (down_x, down_y), pad)

    def ref() -> Tensor:
        return upfirdn2d_ref(x, k, up=(up_x, up_y), down=(down_x, down_y), padding=pad, flip_filter=True).clone(
            memory_format=torch.contiguous_format
        )

    return _with_fallback("upfirdn2d", fused, ref)


@upfirdn2d_op.register_fake
def _(x, k, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
    torch._check(x.dim() == 4 and k.dim() == 2)
    ho, wo = upfirdn2d_out_size(
        x.shape[2], x.shape[3], k.shape[0], k.shape[1], up_x, up_y, down_x, down_y, (pad_x0, pad_x1, pad_y0, pad_y1)
    )
    return x.new_empty((x.shape[0], x.shape[1], ho, wo))


def _upfirdn2d_setup(ctx, inputs, output):
    x, k, up_x, up_y, down_x, down_y, pad_x0, _pad_x1, pad_y0, _pad_y1 = inputs
    ctx.save_for_backward(k)
    ctx.args = (x.shape[2], x.shape[3], up_x, up_y, down_x, down_y, pad_x0, pad_y0, output.shape[2], output.shape[3])


def upfirdn2d_adjoint(
    grad: Tensor, k: Tensor, in_size: tuple[int, int], up: tuple[int, int], down: tuple[int, int], pad0: tuple[int, int]
) -> Tensor:
    """The gradient of upfirdn2d(x; k, up, down, pad) in x for the output gradient `grad` (see the module
    docstring): an upfirdn2d with the kernel flipped and up/down swapped. in_size (H, W); pad0 (px0, py0)."""
    (h, w), (up_x, up_y), (down_x, down_y), (pad_x0, pad_y0) = in_size, up, down, pad0
    fh, fw = k.shape
    ho, wo = grad.shape[2], grad.shape[3]
    return upfirdn2d_op(
        grad,
        k.flip([0, 1]),
        down_x,
        down_y,
        up_x,
        up_y,
        fw - 1 - pad_x0,
        w * up_x - wo * down_x + pad_x0 - up_x + 1,
        fh - 1 - pad_y0,
        h * up_y - ho * down_y + pad_y0 - up_y + 1,
    )


def _upfirdn2d_backward(ctx, grad):
    (k,) = ctx.saved_tensors
    h, w, up_x, up_y, down_x, down_y, pad_x0, pad_y0, _ho, _wo = ctx.args
    grad_x = upfirdn2d_adjoint(grad, k, (h, w), (up_x, up_y), (down_x, down_y), (pad_x0, pad_y0))
    return grad_x, None, None, None, None, None, None, None, None, None


upfirdn2d_op.register_autograd(_upfirdn2d_backward, setup_context=_upfirdn2d_setup)


# ----------------------------------------------------------------------------------------------------- bias_act


def _clamp_or_none(clamp: float) -> float | None:
    return None if clamp < 0 else clamp


@torch.library.custom_op("ganpipe::bias_act", mutates_args=())
def bias_act_op(
    x: Tensor, b: Tensor | None, dim: int, act: str, alpha: float, gain: float, clamp: float
) -> Tensor:  # fmt: skip
    """y = clamp(act(x + b[broadcast along dim], alpha) * gain, -clamp, clamp); clamp < 0 disables clamping."""

    def fused() -> Tensor:
        return _kernels().bias_act(x, b, dim, act, alpha, gain, _clamp_or_none(clamp))

    def ref() -> Tensor:
        return bias_act_ref(x, b, dim, act, alpha, gain, _clamp_or_none(clamp)).clone(
            memory_format=torch.contiguous_format
        )

    return _with_fallback("bias_act", fused, ref)


@bias_act_op.register_fake
def _(x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _reduce_to_bias(g: Tensor, b: Tensor | None, dim: int) -> Tensor | None:
    if b is None:
        return None
    return g.sum(dim=[i for i in range(g.ndim) if i != dim]).to(b.dtype)


def _bias_act_setup(ctx, inputs, output):
    x, b, dim, act, alpha, gain, clamp = inputs
    ctx.save_for_backward(x, b)
    ctx.args = (dim, act, alpha, gain, clamp)


def _bias_act_backward(ctx, grad):
    x, b = ctx.saved_tensors
    dim, act, alpha, gain, clamp = ctx.args
    grad_x = bias_act_grad_op(grad, x, b, dim, act, alpha, gain, clamp)
    return grad_x, _reduce_to_bias(grad_x, b, dim), None, None, None, None, None


bias_act_op.register_autograd(_bias_act_backward, setup_context=_bias_act_setup)


def _bias_act_grad_ref(
    dy: Tensor, x: Tensor, b: Tensor | None, dim: int, act: str, alpha: float, gain: float, clamp: float
) -> Tensor:
    """dy * act'(z) * gain * clamp mask with z = x + b, from torch ops (the fallback of `bias_act_grad_op`; autograd
    is not available inside a custom op's implementation, so the derivative is written out)."""
    z = _add_bias(x, b, dim)
    d = act_first_derivative(z, act, alpha) * gain
    if clamp >= 0:
        pre = ACTIVATIONS[act].func(z, alpha) * gain
        d = torch.where(pre.abs() < clamp, d, torch.zeros_like(d))
    return (dy * d).to(x.dtype).contiguous()


def act_first_derivative(z: Tensor, act: str, alpha: float) -> Tensor:
    """act'(z) with torch's conventions at the kinks (the positive branch only for z > 0)."""
    if act == "linear":
        return torch.ones_like(z)
    if act in ("relu", "lrelu"):
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha if act == "lrelu" else 0.0))
    if act == "tanh":
        return 1 - torch.tanh(z).square()
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if act == "elu":
        return torch.where(z > 0, torch.ones_like(z), torch.exp(z.clamp(max=0)))
    if act == "selu":
        return SELU_SCALE * torch.where(z > 0, torch.ones_like(z), SELU_ALPHA * torch.exp(z.clamp(max=0)))
    if act == "softplus":
        return torch.sigmoid(z)
    if act == "swish":
        s = torch.sigmoid(z)
        return s + z * s * (1 - s)
    raise ValueError(f"unknown activation {act!r}")


@torch.library.custom_op("ganpipe::bias_act_grad", mutates_args=())
def bias_act_grad_op(
    dy: Tensor, x: Tensor, b: Tensor | None, dim: int, act: str, alpha: float, gain: float, clamp: float
) -> Tensor:
    """dx = dy * act'(x + b) * gain * [|act(x + b) * gain| < clamp] (the gradient of `bias_act_op` in x)."""

    def fused() -> Tensor:
        return _kernels().bias_act(x, b, dim, act, alpha, gain, _clamp_or_none(clamp), dy=dy)

    def ref() -> Tensor:
        return _bias_act_grad_ref(dy, x, b, dim, act, alpha, gain, clamp)

    return _with_fallback("bias_act", fused, ref)


@bias_act_grad_op.register_fake
def _(dy, x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_bias(x: Tensor, b: Tensor | None, dim: int) -> Tensor:
    if b is None:
        return x
    return x + b.to(x.dtype).reshape([-1 if i == dim else 1 for i in range(x.ndim)])


def act_second_derivative(z: Tensor, act: str, alpha: float) -> Tensor | None:
    """act''(z) from differentiable torch ops, or None where it is zero almost everywhere (piecewise linear)."""
    if act in ("linear", "relu", "lrelu"):
        return None
    if act == "tanh":
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)
    if act in ("sigmoid", "softplus"):  # softplus' = sigmoid
        s = torch.sigmoid(z)
        d = s * (1 - s)
        return d * (1 - 2 * s) if act == "sigmoid" else d
    if act == "elu":
        return torch.where(z > 0, torch.zeros_like(z), torch.exp(z.clamp(max=0)))
    if act == "selu":
        return torch.where(z > 0, torch.zeros_like(z), SELU_SCALE * SELU_ALPHA * torch.exp(z.clamp(max=0)))
    if act == "swish":
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    raise ValueError(f"unknown activation {act!r}")


def _bias_act_grad_setup(ctx, inputs, output):
    dy, x, b, dim, act, alpha, gain, clamp = inputs
    ctx.save_for_backward(dy, x, b)
    ctx.args = (dim, act, alpha, gain, clamp)


def _bias_act_grad_backward(ctx, grad):
    dy, x, b = ctx.saved_tensors
    dim, act, alpha, gain, clamp = ctx.args
    grad_dy = bias_act_grad_op(grad, x, b, dim, act, alpha, gain, clamp) if ctx.needs_input_grad[0] else None
    grad_x = grad_b = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        z = _add_bias(x, b, dim)
        d2 = act_second_derivative(z, act, alpha)
        if d2 is not None:
            grad_z = grad * dy * d2 * gain
            if clamp >= 0:  # the clamp mask is piecewise constant: it only gates the second derivative
                pre = ACTIVATIONS[act].func(z, alpha) * gain
                grad_z = torch.where(pre.abs() < clamp, grad_z, torch.zeros_like(grad_z))
            grad_x = grad_z.to(x.dtype)
            grad_b = _reduce_to_bias(grad_z, b, dim)
    return grad_dy, grad_x, grad_b, None, None, None, None, None


bias_act_grad_op.register_autograd(_bias_act_grad_backward, setup_context=_bias_act_grad_setup)


# ----------------------------------------------------------------------------------------------- scale_bias_act


def _scalebias_act_ref(
    x: Tensor, s: Tensor, noise: Tensor | None, b: Tensor | None, act: str, alpha: float, gain: float, clamp: float
) -> Tensor:
    z = x * s.to(x.dtype).reshape(s.shape[0], s.shape[1], 1, 1)
    if noise is not None:
        z = z + noise.to(x.dtype)
    return bias_act_ref(z, b, 1, act, alpha, gain, _clamp_or_none(clamp)).contiguous()


@torch.library.custom_op("ganpipe::scale_bias_act", mutates_args=())
def scale_bias_act_op(
    x: Tensor, s: Tensor, noise: Tensor | None, b: Tensor | None, act: str, alpha: float, gain: float, clamp: float
) -> Tensor:
    """y[n,c,h,w] = clamp(act(x[n,c,h,w] * s[n,c] + noise[...] + b[c], alpha) * gain), clamp < 0 meaning none
    (noise broadcastable to x). The non-fused `modulated_conv2d` runs its input modulation (x * styles) and its
    whole epilogue (demodulation, noise, bias, activation, gain, clamp) as one pass of this op each."""

    def fused() -> Tensor:
        return _kernels().scale_bias_act(x, s, noise, b, act, alpha, gain, _clamp_or_none(clamp))

    return _with_fallback(
        "modulated_conv2d", fused, lambda: _scalebias_act_ref(x, s, noise, b, act, alpha, gain, clamp)
    )


@scale_bias_act_op.register_fake
def _(x, s, noise, b, act, alpha, gain, clamp):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def scale(x: Tensor, s: Tensor) -> Tensor:
    """x[n,c,h,w] * s[n,c] through the fused op (differentiable to any order)."""
    return scale_bias_act_op(x, s, None, None, "linear", 0.0, 1.0, -1.0)


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape` (the inverse of broadcasting)."""
    lead = g.ndim - len(shape)
    g = g.sum(dim=list(range(lead))) if lead > 0 else g
    dims = [i for i, size in enumerate(shape) if size == 1 and g.shape[i] != 1]
    return g.sum(dim=dims, keepdim=True) if dims else g


def _scale_bias_act_setup(ctx, inputs, output):
    x, s, noise, b, act, alpha, gain, clamp = inputs
    ctx.save_for_backward(x, s, noise, b)
    ctx.args = (act, alpha, gain, clamp)


def _scale_bias_act_backward(ctx, grad):
    x, s, noise, b = ctx.saved_tensors
    act, alpha, gain, clamp = ctx.args
    if act == "linear" and clamp < 0:
        grad_z = grad * gain if gain != 1.0 else grad
    else:
        # z = x * s + noise is recomputed (one elementwise pass) rather than kept alive from the forward.
        z = scale_bias_act_op(x, s, noise, None, "linear", 0.0, 1.0, -1.0)
        grad_z = bias_act_grad_op(grad, z, b, 1, act, alpha, gain, clamp)
    needs = ctx.needs_input_grad
    grad_x = scale(grad_z, s) if needs[0] else None
    grad_s = (grad_z * x).sum(dim=(2, 3)).to(s.dtype) if needs[1] else None
    grad_noise = _sum_to(grad_z, noise.shape).to(noise.dtype) if noise is not None and needs[2] else None
    grad_b = grad_z.sum(dim=(0, 2, 3)).to(b.dtype) if b is not None and needs[3] else None
    return grad_x, grad_s, grad_noise, grad_b, None, None, None, None


scale_bias_act_op.register_autograd(_scale_bias_act_backward, setup_context=_scale_bias_act_setup)


# ----------------------------------------------------------------------------------------------- filtered_lrelu


def _kernel_2d(ky: Tensor, kx: Tensor) -> Tensor:
    """sum_r ky[r] outer kx[r]: the 2-D correlation kernel of a separable factorization."""
    return torch.einsum("rh,rw->hw", ky, kx)


def _filtered_lrelu_ref(x, b, kuy, kux, kdy, kdx, up, down, pad, gain, slope, clamp) -> Tensor:
    z = bias_act_ref(x, b, 1, "linear", 0.0, 1.0, None)
    u = upfirdn2d_ref(z, _kernel_2d(kuy, kux), up=up, padding=pad, flip_filter=True)
    v = bias_act_ref(u, None, 1, "lrelu", slope, gain, _clamp_or_none(clamp))
    return upfirdn2d_ref(v, _kernel_2d(kdy, kdx), down=down, flip_filter=True).contiguous()


@torch.library.custom_op("ganpipe::filtered_lrelu", mutates_args=())
def filtered_lrelu_op(
    x: Tensor,
    b: Tensor | None,
    kuy: Tensor,
    kux: Tensor,
    kdy: Tensor,
    kdx: Tensor,
    up: int,
    down: int,
    pad_x0: int,
    pad_x1: int,
    pad_y0: int,
    pad_y1: int,
    gain: float,
    slope: float,
    clamp: float,
) -> Tensor:
    """y = upfirdn2d(clamp(lrelu(upfirdn2d(x + b, ku, up, pad), slope) * gain), kd, down) in one kernel, with
    ku = sum_r kuy[r] outer kux[r] and kd likewise (correlation kernels, gains folded in); clamp < 0: none."""
    pad = (pad_x0, pad_x1, pad_y0, pad_y1)

    def fused() -> Tensor:
        return _kernels().filtered_lrelu(
            x, b, (kuy, kux), (kdy, kdx), up, down, pad, gain, slope, _clamp_or_none(clamp)
        )

    return _with_fallback(
        "filtered_lrelu",
        fused,
        lambda: _filtered_lrelu_ref(x, b, kuy, kux, kdy, kdx, up, down, pad, gain, slope, clamp),
    )


def filtered_lrelu_out_size(h: int, w: int, ku: tuple[int, int], kd: tuple[int, int], up: int, down: int,
                            pad: tuple[int, int, int, int]) -> tuple[int, int]:  # fmt: skip
    hu, wu = upfirdn2d_out_size(h, w, ku[0], ku[1], up, up, 1, 1, pad)
    return (hu - kd[0]) // down + 1, (wu - kd[1]) // down + 1


@filtered_lrelu_op.register_fake
def _(x, b, kuy, kux, kdy, kdx, up, down, pad_x0, pad_x1, pad_y0, pad_y1, gain, slope, clamp):
    ho, wo = filtered_lrelu_out_size(
        x.shape[2], x.shape[3], (kuy.shape[1], kux.shape[1]), (kdy.shape[1], kdx.shape[1]), up, down,
        (pad_x0, pad_x1, pad_y0, pad_y1),
    )  # fmt: skip
    return x.new_empty((x.shape[0], x.shape[1], ho, wo))


def _filtered_lrelu_setup(ctx, inputs, output):
    x, b, kuy, kux, kdy, kdx, up, down, pad_x0, pad_x1, pad_y0, pad_y1, gain, slope, clamp = inputs
    ctx.save_for_backward(x, b, kuy, kux, kdy, kdx)
    ctx.args = (up, down, (pad_x0, pad_x1, pad_y0, pad_y1), gain, slope, clamp)


def _filtered_lrelu_backward(ctx, grad):
    """Through the fused ops: dv = adjoint of the downsampling, du = dv * lrelu'(u) * gain * clamp mask (u, the
    upsampled pre-activation, is recomputed), dz = adjoint of the upsampling; every step is differentiable."""
    x, b, kuy, kux, kdy, kdx = ctx.saved_tensors
    up, down, pad, gain, slope, clamp = ctx.args
    ku, kd = _kernel_2d(kuy, kux), _kernel_2d(kdy, kdx)
    z = x if b is None else bias_act_op(x, b, 1, "linear", 0.0, 1.0, -1.0)
    u = upfirdn2d_op(z, ku, up, up, 1, 1, *pad)
    dv = upfirdn2d_adjoint(grad, kd, (u.shape[2], u.shape[3]), (1, 1), (down, down), (0, 0))
    du = bias_act_grad_op(dv, u, None, 1, "lrelu", slope, gain, clamp)
    dz = upfirdn2d_adjoint(du, ku, (x.shape[2], x.shape[3]), (up, up), (1, 1), (pad[0], pad[2]))
    grad_b = _reduce_to_bias(dz, b, 1) if b is not None and ctx.needs_input_grad[1] else None
    return dz, grad_b, None, None, None, None, None, None, None, None, None, None, None, None, None


filtered_lrelu_op.register_autograd(_filtered_lrelu_backward, setup_context=_filtered_lrelu_setup)
