"""Triton kernels of pipeline.ops and their launchers. Imported lazily, on the first call with impl='triton', so
that `TRITON_INTERPRET` (read by `triton.jit` when a kernel is decorated) can still be set by a test harness.

Every launch configuration is a small named table at the top of this file (`UPFIRDN2D_TILES`, `BIAS_ACT_CONFIG`)
so that it can be tuned from benchmark numbers without touching the kernels. What Triton compiles one binary for
(pointer dtypes, constexprs, warps) is chosen per call by a pure `*_variant` function returning a `KernelVariant`;
the launchers use it and `pipeline.ops.aot` compiles the same variants ahead of time for GPU targets.

Design (all kernels compute in float32, or float64 for float64 inputs, and store in the input's dtype):

upfirdn2d -- one program per output tile of BLOCK_H rows x BLOCK_W columns, the rows running over the flattened
    (plane, output row) axis so that small planes pack several to a program; every output sample is computed
    exactly once, directly from the input (no zero-inserted or padded intermediate ever exists in memory).
    Polyphase: for output row oy the tap-0 position in the zero-inserted image is p = oy*down - pad0; only the
    taps a = a0 + j*up with a0 = (-p) mod up hit real samples, so each output reads ceil(fh/up) x ceil(fw/up)
    inputs (2 x 2 for a 4-tap 2x upsampler, not 4 x 4). The tap loops are unrolled (tap counts and factors are
    constexpr); the filter is a 2-D correlation kernel with the gain folded in, gathered from a few hundred
    bytes that stay in L1. DRAM traffic per output: (1 / (up_x up_y)) input reads when upsampling, (down_x
    down_y) when downsampling, plus one write; the overlap between neighbouring taps/tiles (a halo of fh-1 rows
    and fw-1 columns per tile) is served by L1/L2. The ideal is therefore in + out bytes, i.e. copy speed.
bias_act -- one elementwise pass, 1 read + 1 write per element (+ the bias, cached). The activation is a
    constexpr so each (act, has_bias, has_clamp) combination compiles to straight-line code. For [N, C, H, W]
    with a large H*W the grid is (blocks along H*W, N*C rows) so that the channel is a per-program scalar (no
    per-element integer division); small inner sizes use a flat grid with an int division per element.
bias_act_grad -- the same pass for dx = dy * act'(x + b) * gain * [|pre-clamp y| < clamp]: 2 reads + 1 write.
scale_bias_act -- the modulated convolution's surroundings in one pass each: the input modulation x * s[n, c]
    and the epilogue clamp(act(y * d[n, c] + noise + b[c]) * gain) (demodulation, noise, bias, activation, gain,
    clamp), 1 read + 1 write per element (+ the noise plane, broadcast over channels and cached).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from pipeline.ops._ref import SELU_ALPHA as _SELU_ALPHA
from pipeline.ops._ref import SELU_SCALE as _SELU_SCALE
from pipeline.ops._tiles import filtered_lrelu_tiles, kernel_limit

# Activation ids shared with the launchers; the order is part of no public API.
ACT_IDS: dict[str, int] = {
    "linear": 0,
    "relu": 1,
    "lrelu": 2,
    "tanh": 3,
    "sigmoid": 4,
    "elu": 5,
    "selu": 6,
    "softplus": 7,
    "swish": 8,
}
SELU_ALPHA: tl.constexpr = tl.constexpr(_SELU_ALPHA)
SELU_SCALE: tl.constexpr = tl.constexpr(_SELU_SCALE)


@dataclass(frozen=True)
class KernelVariant:
    """One binary of a kernel: the element dtype of each pointer argument, the constexprs, the warp count and the
    pipelining depth of its loops (None: Triton's default; every other argument is a 32-bit scalar). Triton
    specializes on nothing else that changes shared memory."""

    kernel: str  # a key of KERNELS
    pointers: tuple[tuple[str, torch.dtype], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int | None = None

    def __getitem__(self, name: str) -> Any:
        return dict(self.constexprs)[name]

    @property
    def options(self) -> dict[str, int]:
        """Triton's compile options of this variant."""
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        return {"num_warps": self.num_warps, **stages}

    @property
    def launch_kwargs(self) -> dict[str, Any]:
        return {**dict(self.constexprs), **self.options}


def _variant(
    kernel: str, pointers: dict[str, torch.dtype], num_warps: int, num_stages: int | None = None, **constexprs: Any
) -> KernelVariant:
    return KernelVariant(kernel, tuple(pointers.items()), tuple(constexprs.items()), num_warps, num_stages)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in float32, or in float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TileConfig:
    """Output tile of one upfirdn2d program and its warp count."""

    block_h: int
    block_w: int
    num_warps: int


@dataclass(frozen=True)
class ElementwiseConfig:
    """Elements per program of an elementwise kernel and its warp count."""

    block: int
    num_warps: int


# upfirdn2d tiles, picked by the kind of resampling. 64 columns = 128 B rows in bf16 (one full cache line per
# row per tap); 1024-2048 outputs per program keeps enough loads in flight to saturate HBM on H100 while the
# (tile + halo) input footprint stays in L1. Downsampling reads down_x * down_y inputs per output, so its tiles
# are smaller in outputs (same input footprint).
UPFIRDN2D_TILES: dict[str, TileConfig] = {
    "up": TileConfig(block_h=16, block_w=64, num_warps=4),
    "down": TileConfig(block_h=8, block_w=64, num_warps=4),
    "same": TileConfig(block_h=16, block_w=64, num_warps=4),
}
# Taps read per output (ceil(fh/up_y) * ceil(fw/up_x)) above which the tap rows become a loop: unrolled, 36 taps
# (12x12, 2x up) spilled registers at 4 warps on sm_90 and 576 (24x24, 4x down: filtered_lrelu's backward) took
# 339 s to compile; rolled, 0.3-1.1 s and under 60 registers (`pipeline.ops.aot` measures it).
UPFIRDN2D_MAX_TAPS = 16
# bias_act: 4096 elements / 256 threads = 16 per thread = two 128-bit vectors in bf16, four in fp32.
BIAS_ACT_CONFIG = ElementwiseConfig(block=4096, num_warps=8)
# Row mode (channel is a per-program scalar) when each (n, c) row holds at least this many elements.
BIAS_ACT_ROW_MIN_INNER = 1024
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension


def _pick_tile(up_x: int, up_y: int, down_x: int, down_y: int, out_w: int) -> tuple[int, int, int]:
    """(block_h, block_w, num_warps): the tile's width shrinks to the output width (a power of two, at least 16)
    and its height grows to keep the tile's output count, so narrow planes are packed several per program."""
    if down_x * down_y > 1:
        cfg = UPFIRDN2D_TILES["down"]
    elif up_x * up_y > 1:
        cfg = UPFIRDN2D_TILES["up"]
    else:
        cfg = UPFIRDN2D_TILES["same"]
    block_w = min(cfg.block_w, max(16, triton.next_power_of_2(out_w)))
    return cfg.block_h * cfg.block_w // block_w, block_w, cfg.num_warps


def upfirdn2d_variant(
    dtype: torch.dtype,
    filter_shape: tuple[int, int],
    up: tuple[int, int],
    down: tuple[int, int],
    pad: tuple[int, int, int, int],
    out_w: int,
) -> KernelVariant:
    """The `_upfirdn2d_kernel` binary for x of `dtype`, a [fh, fw] kernel, up/down (x, y), pad (x0, x1, y0, y1)."""
    (ux, uy), (dx, dy), (fh, fw) = up, down, filter_shape
    block_h, block_w, num_warps = _pick_tile(ux, uy, dx, dy, out_w)
    rolled = -(-fh // uy) * -(-fw // ux) > UPFIRDN2D_MAX_TAPS
    pointers = {"x_ptr": dtype, "k_ptr": _accumulator(dtype), "y_ptr": dtype}
    return _variant(
        "upfirdn2d", pointers, num_warps, UX=ux, UY=uy, DX=dx, DY=dy, PX0=pad[0], PY0=pad[2], FW=fw, FH=fh,
        BLOCK_H=block_h, BLOCK_W=block_w, ROLLED=rolled,
    )  # fmt: skip


@triton.jit
def _upfirdn2d_tap_row(
    acc, j, ay0, ax0, py, px, x_rows, k_ptr, H, W, in_rows, in_cols,
    UX: tl.constexpr, UY: tl.constexpr, FW: tl.constexpr, FH: tl.constexpr,
):  # fmt: skip
    """acc + the taps of filter row ay0 + j * UY (those on real samples), for every output of the tile."""
    ay = ay0 + j * UY
    iy = (py + ay) // UY  # exact: py + ay is a multiple of UY
    row_ok = (ay < FH) & (iy >= 0) & (iy < H) & in_rows
    for i in tl.static_range((FW + UX - 1) // UX):
        ax = ax0 + i * UX
        ix = (px + ax) // UX
        col_ok = (ax < FW) & (ix >= 0) & (ix < W) & in_cols
        m = row_ok[:, None] & col_ok[None, :]
        v = tl.load((x_rows + iy * W)[:, None] + ix[None, :], mask=m, other=0.0)
        kv = tl.load(k_ptr + ay[:, None] * FW + ax[None, :], mask=m, other=0.0)
        acc += v.to(acc.dtype) * kv
    return acc


@triton.jit
def _upfirdn2d_kernel(
    x_ptr,
    k_ptr,
    y_ptr,
    H,
    W,
    HO,
    WO,
    ROWS,
    UX: tl.constexpr,
    UY: tl.constexpr,
    DX: tl.constexpr,
    DY: tl.constexpr,
    PX0: tl.constexpr,
    PY0: tl.constexpr,
    FW: tl.constexpr,
    FH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROLLED: tl.constexpr,
):
    # Rows of the tile index the flattened (plane, output row) axis, so that one program covers several small
    # planes (4x4 .. 16x16 outputs would otherwise leave most of a 16 x 64 tile masked off).
    r = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    ox = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    plane = r // HO
    oy = r % HO
    # Position of tap 0 in the zero-inserted, unpadded image; the first tap on a real sample is a0 = (-p) mod up
    # (written so that C-style and floor modulo agree on negative p).
    py = oy * DY - PY0
    px = ox * DX - PX0
    ay0 = ((-py) % UY + UY) % UY
    ax0 = ((-px) % UX + UX) % UX
    x_rows = x_ptr + plane * H * W
    in_rows = r < ROWS
    in_cols = ox < WO
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=k_ptr.dtype.element_ty)
    if ROLLED:  # many taps: a loop over tap rows keeps the code (and its compile time) small
        for j in range((FH + UY - 1) // UY):
            acc = _upfirdn2d_tap_row(acc, j, ay0, ax0, py, px, x_rows, k_ptr, H, W, in_rows, in_cols, UX, UY, FW, FH)
    else:
        for j in tl.static_range((FH + UY - 1) // UY):
            acc = _upfirdn2d_tap_row(acc, j, ay0, ax0, py, px, x_rows, k_ptr, H, W, in_rows, in_cols, UX, UY, FW, FH)
    out_ok = in_rows[:, None] & in_cols[None, :]
    tl.store(y_ptr + (r * WO)[:, None] + ox[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def upfirdn2d(
    x: torch.Tensor,
    k: torch.Tensor,
    up: tuple[int, int],
    down: tuple[int, int],
    pad: tuple[int, int, int, int],
) -> torch.Tensor:
    """Launch `_upfirdn2d_kernel`: x [N, C, H, W] (any layout; made contiguous), k [fh, fw] a correlation kernel
    with the gain folded in (float32, or float64 for float64 x), up/down (x, y), pad (x0, x1, y0, y1)."""
    n, c, h, w = (int(s) for s in x.shape)
    fh, fw = (int(s) for s in k.shape)
    (ux, uy), (dx, dy) = up, down
    px0, px1, py0, py1 = pad
    ho = (h * uy + py0 + py1 - fh) // dy + 1
    wo = (w * ux + px0 + px1 - fw) // dx + 1
    assert ho >= 1 and wo >= 1, "padded, upsampled image is smaller than the filter"
    x = x.contiguous()
    k = k.contiguous()
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    variant = upfirdn2d_variant(x.dtype, (fh, fw), up, down, pad, wo)
    rows = n * c * ho
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _upfirdn2d_kernel[(triton.cdiv(rows, variant["BLOCK_H"]), triton.cdiv(wo, variant["BLOCK_W"]))](
            x, k, y, h, w, ho, wo, rows, **variant.launch_kwargs
        )
    return y


@triton.jit
def _tanh(z):
    # tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|): never overflows.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _sigmoid(z):
    # exp of a non-positive argument only, so no overflow for large |z|.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _act_fwd(z, alpha, ACT: tl.constexpr):
    if ACT == 0:
        y = z
    elif ACT == 1:
        y = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        y = tl.where(z > 0, z, z * alpha)
    elif ACT == 3:
        y = _tanh(z)
    elif ACT == 4:
        y = _sigmoid(z)
    elif ACT == 5:
        y = tl.where(z > 0, z, tl.exp(tl.minimum(z, 0.0)) - 1.0)
    elif ACT == 6:
        y = tl.where(z > 0, z, SELU_ALPHA * (tl.exp(tl.minimum(z, 0.0)) - 1.0)) * SELU_SCALE
    elif ACT == 7:
        # softplus = max(z, 0) + log(1 + exp(-|z|)); torch switches to the identity above 20 (same to 2e-9).
        y = tl.where(z > 20.0, z, tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))))
    else:
        y = z * _sigmoid(z)
    return y


@triton.jit
def _act_grad(z, alpha, ACT: tl.constexpr):
    """d act / dz with torch's conventions at the kinks (relu/lrelu: z > 0 takes the positive branch)."""
    if ACT == 0:
        d = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(z > 0, 1.0, alpha)
    elif ACT == 3:
        t = _tanh(z)
        d = 1.0 - t * t
    elif ACT == 4:
        s = _sigmoid(z)
        d = s * (1.0 - s)
    elif ACT == 5:
        d = tl.where(z > 0, 1.0, tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 6:
        d = tl.where(z > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 7:
        d = tl.where(z > 20.0, 1.0, _sigmoid(z))
    else:
        s = _sigmoid(z)
        d = s + z * s * (1.0 - s)
    return d.to(z.dtype)


@triton.jit
def _bias_act_kernel(
    x_ptr,
    b_ptr,
    dy_ptr,
    out_ptr,
    numel,
    C,
    INNER,
    alpha,
    gain,
    clamp,
    params_ptr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    GRAD: tl.constexpr,
    ROWS: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """GRAD=False: out = clamp(act(x + b) * gain). GRAD=True: out = dy * act'(x + b) * gain * clamp mask.
    ROWS=True: grid (blocks of INNER, rows); row r of the [rows, INNER] view has channel r % C."""
    if ROWS:
        row = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = cols < INNER
        offs = row * INNER + cols
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if F64:
        # Scalar arguments are float32 in Triton; float64 runs read (alpha, gain, clamp) from a float64 tensor.
        z = x.to(tl.float64)
        alpha = tl.load(params_ptr)
        gain = tl.load(params_ptr + 1)
        clamp = tl.load(params_ptr + 2)
    else:
        z = x.to(tl.float32)
    if HAS_BIAS:
        if ROWS:
            z += tl.load(b_ptr + row % C).to(z.dtype)
        else:
            z += tl.load(b_ptr + (offs // INNER) % C, mask=m, other=0.0).to(z.dtype)
    y = _act_fwd(z, alpha, ACT) * gain
    if GRAD:
        d = _act_grad(z, alpha, ACT) * gain
        if HAS_CLAMP:  # torch.clamp passes the gradient strictly inside (-clamp, clamp), as NVIDIA's kernel does
            d = tl.where(tl.abs(y) < clamp, d, 0.0)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(z.dtype)
        out = dy * d
    else:
        if HAS_CLAMP:
            y = tl.minimum(tl.maximum(y, -clamp), clamp)
        out = y
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


def bias_act_variant(
    dtype: torch.dtype, act: str, has_bias: bool, has_clamp: bool, grad: bool, rows: bool
) -> KernelVariant:
    """The `_bias_act_kernel` binary: forward or gradient (`grad`), per-row channel (`rows`) or flat indexing."""
    f64 = dtype == torch.float64
    pointers = {name: dtype for name in ("x_ptr", "b_ptr", "dy_ptr", "out_ptr")}
    pointers["params_ptr"] = torch.float64 if f64 else dtype
    cfg = BIAS_ACT_CONFIG
    return _variant(
        "bias_act", pointers, cfg.num_warps, ACT=ACT_IDS[act], HAS_BIAS=has_bias, HAS_CLAMP=has_clamp, GRAD=grad,
        ROWS=rows, F64=f64, BLOCK=cfg.block,
    )  # fmt: skip


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
    dy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch `_bias_act_kernel`: the forward (dy None) or dx for the incoming gradient dy. x any shape (made
    contiguous), b [x.shape[dim]] or None. Returns a contiguous tensor of x's shape and dtype."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    numel = x.numel()
    if numel == 0:
        return out
    channels = int(x.shape[dim]) if x.ndim else 1
    inner = math.prod(int(s) for s in x.shape[dim + 1 :]) if x.ndim else 1
    rows = numel // inner
    if b is not None:
        b = b.contiguous()
    if dy is not None:
        dy = dy.contiguous()
    use_rows = inner >= BIAS_ACT_ROW_MIN_INNER and rows <= MAX_GRID_Y
    variant = bias_act_variant(x.dtype, act, b is not None, clamp is not None, dy is not None, use_rows)
    block = variant["BLOCK"]
    grid = (triton.cdiv(inner, block), rows) if use_rows else (triton.cdiv(numel, block),)
    clamp_value = float(clamp if clamp is not None else 0.0)
    f64 = x.dtype == torch.float64
    # Only float64 needs the parameters at full precision; a host-to-device copy per call would cost a sync.
    params = torch.tensor([alpha, gain, clamp_value], dtype=torch.float64, device=x.device) if f64 else x
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _bias_act_kernel[grid](
            x, b if b is not None else x, dy if dy is not None else x, out,
            numel, channels, inner, float(alpha), float(gain), clamp_value, params, **variant.launch_kwargs,
        )  # fmt: skip
    return out


# scale_bias_act: one pass over [N, C, H, W] viewed as [N*C rows, H*W columns]; a tile is BLOCK_R rows x BLOCK_C
# columns (BLOCK_C shrinks to H*W for small planes, BLOCK_R grows to keep 4096 elements per program), so the
# per-(n, c) scale and the per-channel bias are loaded once per row, not once per element. Rows of 1024 columns
# or more take 16 warps: at 8, ptxas held the float32 4 x 1024 tile to 64 registers and spilled on sm_80, and 4
# warps spilled on narrow tiles (`pipeline.ops.aot`).
SCALE_BIAS_ACT_CONFIG = ElementwiseConfig(block=4096, num_warps=8)
SCALE_BIAS_ACT_WIDE_WARPS = 16


@triton.jit
def _scale_bias_act_kernel(
    x_ptr,
    s_ptr,
    noise_ptr,
    b_ptr,
    y_ptr,
    ROWS,
    C,
    HW,
    W,
    sn_n,
    sn_c,
    sn_h,
    sn_w,
    alpha,
    gain,
    clamp,
    params_ptr,
    HAS_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = clamp(act(x * s[n, c] + noise + b[c]) * gain)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = row < ROWS
    m = row_ok[:, None] & (cols < HW)[None, :]
    offs = (row * HW)[:, None] + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if F64:  # Triton's scalar arguments are float32; float64 runs read (alpha, gain, clamp) from a tensor
        z = x.to(tl.float64)
        alpha = tl.load(params_ptr)
        gain = tl.load(params_ptr + 1)
        clamp = tl.load(params_ptr + 2)
    else:
        z = x.to(tl.float32)
    z = z * tl.load(s_ptr + row, mask=row_ok, other=0.0).to(z.dtype)[:, None]
    if HAS_NOISE:  # noise is x-shaped through broadcast strides (0 along broadcast axes)
        noff = ((row // C) * sn_n + (row % C) * sn_c)[:, None] + ((cols // W) * sn_h + (cols % W) * sn_w)[None, :]
        z += tl.load(noise_ptr + noff, mask=m, other=0.0).to(z.dtype)
    if HAS_BIAS:
        z += tl.load(b_ptr + row % C, mask=row_ok, other=0.0).to(z.dtype)[:, None]
    z = _act_fwd(z, alpha, ACT) * gain
    if HAS_CLAMP:
        z = tl.minimum(tl.maximum(z, -clamp), clamp)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=m)


def scale_bias_act_variant(
    dtype: torch.dtype, act: str, has_noise: bool, has_bias: bool, has_clamp: bool, plane: int
) -> KernelVariant:
    """The `_scale_bias_act_kernel` binary for [N, C, H, W] planes of H*W = `plane` elements (s, noise and b come in
    x's dtype)."""
    f64 = dtype == torch.float64
    pointers = {name: dtype for name in ("x_ptr", "s_ptr", "noise_ptr", "b_ptr", "y_ptr")}
    pointers["params_ptr"] = torch.float64 if f64 else dtype
    cfg = SCALE_BIAS_ACT_CONFIG
    block_c = min(cfg.block, max(16, triton.next_power_of_2(plane)))
    num_warps = SCALE_BIAS_ACT_WIDE_WARPS if block_c >= 1024 else cfg.num_warps
    return _variant(
        "scale_bias_act", pointers, num_warps, HAS_NOISE=has_noise, HAS_BIAS=has_bias, ACT=ACT_IDS[act],
        HAS_CLAMP=has_clamp, F64=f64, BLOCK_R=cfg.block // block_c, BLOCK_C=block_c,
    )  # fmt: skip


def scale_bias_act(
    x: torch.Tensor,
    s: torch.Tensor,
    noise: torch.Tensor | None,
    b: torch.Tensor | None = None,
    act: str = "linear",
    alpha: float = 0.0,
    gain: float = 1.0,
    clamp: float | None = None,
) -> torch.Tensor:
    """y = clamp(act(x * s[n, c] + noise + b[c]) * gain) in one pass. x [N, C, H, W] (made contiguous), s [N, C],
    noise broadcastable to x (any strides) or None, b [C] or None. Returns a contiguous tensor in x's dtype."""
    n, c, h, w = (int(v) for v in x.shape)
    x = x.contiguous()
    s = s.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel() == 0:
        return y
    strides = (0, 0, 0, 0)
    if noise is not None:
        noise = noise.expand(n, c, h, w)
        strides = tuple(int(st) for st in noise.stride())
    if b is not None:
        b = b.contiguous()
    variant = scale_bias_act_variant(x.dtype, act, noise is not None, b is not None, clamp is not None, h * w)
    block_r, block_c = variant["BLOCK_R"], variant["BLOCK_C"]
    clamp_value = float(clamp if clamp is not None else 0.0)
    f64 = x.dtype == torch.float64
    params = torch.tensor([alpha, gain, clamp_value], dtype=torch.float64, device=x.device) if f64 else x
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _scale_bias_act_kernel[(triton.cdiv(n * c, block_r), triton.cdiv(h * w, block_c))](
            x, s, noise if noise is not None else x, b if b is not None else x, y,
            n * c, c, h * w, w, *strides, float(alpha), float(gain), clamp_value, params, **variant.launch_kwargs,
        )  # fmt: skip
    return y


# filtered_lrelu: one program per (image plane, TILE x TILE output tile). Along each axis the two FIR steps are
# banded matrices built in registers from the filter taps, so the upsampled tile never leaves the chip:
#     U = sum_r Uy_r X Ux_r^T,   V = clamp(lrelu(U) * gain),   Y = sum_r Dy_r V Dx_r^T
# with X the (bias-added) input tile, Uy_r[j, m] = kuy_r[(S0 + m) up + py0 - (P0 + j)] (zero off the band) and
# Dy_r[t, j] = kdy_r[j - t down]; r runs over a separable factorization of each 2-D correlation kernel (rank 1
# for the 1-D filters StyleGAN3 mostly uses; the rows of a 2-D kernel otherwise). The products are tl.dot, on
# tensor cores where the dtype allows.


@triton.jit
def _filtered_lrelu_kernel(
    x_ptr,
    b_ptr,
    kuy_ptr,
    kux_ptr,
    kdy_ptr,
    kdx_ptr,
    y_ptr,
    C,
    H,
    W,
    HO,
    WO,
    gain,
    slope,
    clamp,
    params_ptr,
    UP: tl.constexpr,
    DOWN: tl.constexpr,
    PX0: tl.constexpr,
    PY0: tl.constexpr,
    PAD_OFF: tl.constexpr,
    LUH: tl.constexpr,
    LUW: tl.constexpr,
    LDH: tl.constexpr,
    LDW: tl.constexpr,
    RU: tl.constexpr,
    RD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    F64: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE: tl.constexpr,
    VB: tl.constexpr,
    XB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles_w = tl.cdiv(WO, TILE)
    tiles = tl.cdiv(HO, TILE) * tiles_w
    plane = pid // tiles
    tile = pid % tiles
    ty0 = (tile // tiles_w) * TILE
    tx0 = (tile % tiles_w) * TILE
    # First row/column of V this tile reads (P0), and the first input row/column whose zero-inserted sample can
    # reach it: S0 = ceil((P0 - pad) / up), offset by PAD_OFF (a multiple of UP) so the division never sees a
    # negative number. delta = S0 up + pad - P0 is in [0, UP).
    p0y = ty0 * DOWN
    p0x = tx0 * DOWN
    s0y = (p0y - PY0 + PAD_OFF + UP - 1) // UP - PAD_OFF // UP
    s0x = (p0x - PX0 + PAD_OFF + UP - 1) // UP - PAD_OFF // UP
    dly = s0y * UP + PY0 - p0y
    dlx = s0x * UP + PX0 - p0x

    if F64:  # Triton's scalar arguments are float32; float64 runs read (gain, slope, clamp) from a tensor
        gain = tl.load(params_ptr)
        slope = tl.load(params_ptr + 1)
        clamp = tl.load(params_ptr + 2)
        acc_t = tl.float64
    else:
        acc_t = tl.float32

    # The input tile X [XB, XB] (zero outside the image), plus the bias.
    iy = s0y + tl.arange(0, XB)
    ix = s0x + tl.arange(0, XB)
    xm = ((iy >= 0) & (iy < H))[:, None] & ((ix >= 0) & (ix < W))[None, :]
    xt = tl.load(x_ptr + plane * H * W + (iy * W)[:, None] + ix[None, :], mask=xm, other=0.0).to(acc_t)
    if HAS_BIAS:
        xt = tl.where(xm, xt + tl.load(b_ptr + plane % C).to(acc_t), 0.0)

    # Upsampling: U [VB, VB] = sum_r Uy_r [VB, XB] @ X @ UxT_r [XB, VB].
    j = tl.arange(0, VB)
    m = tl.arange(0, XB)
    ay = m[None, :] * UP + dly - j[:, None]
    ax = m[:, None] * UP + dlx - j[None, :]
    u = tl.zeros([VB, VB], dtype=acc_t)
    for r in range(RU):  # a loop, not unrolled: unrolled, rank 12 took 330 s to compile and spilled
        uy = tl.load(kuy_ptr + r * LUH + ay, mask=(ay >= 0) & (ay < LUH), other=0.0).to(acc_t)
        uxt = tl.load(kux_ptr + r * LUW + ax, mask=(ax >= 0) & (ax < LUW), other=0.0).to(acc_t)
        u += tl.dot(tl.dot(uy, xt, input_precision=PRECISION), uxt, input_precision=PRECISION)

    # Leaky ReLU, gain, clamp at the high sampling rate.
    v = tl.where(u > 0, u, u * slope) * gain
    if HAS_CLAMP:
        v = tl.minimum(tl.maximum(v, -clamp), clamp)

    # Downsampling: Y [TILE, TILE] = sum_r Dy_r [TILE, VB] @ V @ DxT_r [VB, TILE].
    t = tl.arange(0, TILE)
    dy_idx = j[None, :] - t[:, None] * DOWN
    dx_idx = j[:, None] - t[None, :] * DOWN
    y = tl.zeros([TILE, TILE], dtype=acc_t)
    for r in range(RD):
        dyr = tl.load(kdy_ptr + r * LDH + dy_idx, mask=(dy_idx >= 0) & (dy_idx < LDH), other=0.0).to(acc_t)
        dxt = tl.load(kdx_ptr + r * LDW + dx_idx, mask=(dx_idx >= 0) & (dx_idx < LDW), other=0.0).to(acc_t)
        y += tl.dot(tl.dot(dyr, v, input_precision=PRECISION), dxt, input_precision=PRECISION)

    oy = ty0 + t
    ox = tx0 + t
    om = (oy < HO)[:, None] & (ox < WO)[None, :]
    tl.store(y_ptr + plane * HO * WO + (oy * WO)[:, None] + ox[None, :], y.to(y_ptr.dtype.element_ty), mask=om)


def filtered_lrelu_variant(
    dtype: torch.dtype,
    up_factors: tuple[int, int, int],
    down_factors: tuple[int, int, int],
    up: int,
    down: int,
    pad: tuple[int, int, int, int],
    has_bias: bool,
    has_clamp: bool,
) -> KernelVariant:
    """The `_filtered_lrelu_kernel` binary for x of `dtype`; up/down_factors = (rank, taps along y, taps along x)
    of the separable factors. V and X tiles grow with the filters and factors: VB covers the upsampled rows one
    output tile reads, XB the input rows they come from."""
    (ru, luh, luw), (rd, ldh, ldw) = up_factors, down_factors
    px0, _, py0, _ = pad
    limit = kernel_limit(up, down, max(luh, luw), max(ldh, ldw))
    assert limit is None, limit  # the op checks it first (resolve_impl); a direct call must not launch it
    tile, vb, xb = filtered_lrelu_tiles(up, down, max(luh, luw), max(ldh, ldw))
    f64 = dtype == torch.float64
    acc = _accumulator(dtype)
    pointers = {"x_ptr": dtype, "b_ptr": dtype, "kuy_ptr": acc, "kux_ptr": acc, "kdy_ptr": acc, "kdx_ptr": acc}
    pointers |= {"y_ptr": dtype, "params_ptr": torch.float64 if f64 else dtype}
    # Warps grow with the tile, and with a rank loop over 32/64-bit tiles, or the products spill registers
    # (sm_80/sm_90, measured with `pipeline.ops.aot`): 64-wide: 8; float32 rank 4: twice that. One stage: the rank
    # loop loads a few filter taps, so pipelining it buys nothing and costs shared memory and registers.
    wide_rank = max(ru, rd) > 1 and dtype.itemsize >= 4
    num_warps = 4 * max(1, vb // 32) * (2 if wide_rank else 1)
    return _variant(
        "filtered_lrelu", pointers, num_warps, 1, UP=up, DOWN=down, PX0=px0, PY0=py0,
        PAD_OFF=up * (max(abs(px0), abs(py0)) // up + 1), LUH=luh, LUW=luw, LDH=ldh, LDW=ldw, RU=ru, RD=rd,
        HAS_BIAS=has_bias, HAS_CLAMP=has_clamp, F64=f64,
        PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32", TILE=tile, VB=vb, XB=xb,
    )  # fmt: skip


def filtered_lrelu(
    x: torch.Tensor,
    b: torch.Tensor | None,
    fu: tuple[torch.Tensor, torch.Tensor],
    fd: tuple[torch.Tensor, torch.Tensor],
    up: int,
    down: int,
    pad: tuple[int, int, int, int],
    gain: float,
    slope: float,
    clamp: float | None,
) -> torch.Tensor:
    """Launch `_filtered_lrelu_kernel`. x [N, C, H, W] (made contiguous), b [C] or None; fu = (kuy [RU, LUH],
    kux [RU, LUW]) and fd = (kdy [RD, LDH], kdx [RD, LDW]) separable factors of the up- and downsampling
    correlation kernels (sum_r kuy[r] outer kux[r]; gains folded in); pad (x0, x1, y0, y1) of the upsampling."""
    n, c, h, w = (int(s) for s in x.shape)
    (kuy, kux), (kdy, kdx) = fu, fd
    (ru, luh), luw = kuy.shape, int(kux.shape[1])
    (rd, ldh), ldw = kdy.shape, int(kdx.shape[1])
    px0, px1, py0, py1 = pad
    hu, wu = h * up + py0 + py1 - luh + 1, w * up + px0 + px1 - luw + 1
    ho, wo = (hu - ldh) // down + 1, (wu - ldw) // down + 1
    assert ho >= 1 and wo >= 1, "padding is too small for the filters: the output would be empty"
    x = x.contiguous()
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    variant = filtered_lrelu_variant(
        x.dtype, (ru, luh, luw), (rd, ldh, ldw), up, down, pad, b is not None, clamp is not None
    )
    tile = variant["TILE"]
    clamp_value = float(clamp if clamp is not None else 0.0)
    f64 = x.dtype == torch.float64
    params = torch.tensor([gain, slope, clamp_value], dtype=torch.float64, device=x.device) if f64 else x
    grid = (n * c * triton.cdiv(ho, tile) * triton.cdiv(wo, tile),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _filtered_lrelu_kernel[grid](
            x, b if b is not None else x, kuy.contiguous(), kux.contiguous(), kdy.contiguous(), kdx.contiguous(), y,
            c, h, w, ho, wo, float(gain), float(slope), clamp_value, params, **variant.launch_kwargs,
        )  # fmt: skip
    return y


KERNELS = {
    "upfirdn2d": _upfirdn2d_kernel,
    "bias_act": _bias_act_kernel,
    "scale_bias_act": _scale_bias_act_kernel,
    "filtered_lrelu": _filtered_lrelu_kernel,
}
