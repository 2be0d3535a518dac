"""Equivariance metrics of generators with an input transform (StyleGAN3): EQ-T, EQ-T_frac and EQ-R.

NVIDIA's names and definitions (Karras et al. 2021, "Alias-Free Generative Adversarial Networks", Appendix E;
`metrics/equivariance.py` of NVlabs/stylegan3, re-implemented here from its description, not copied):
`eqtN_int`, `eqtN_frac` and `eqrN` draw N images (N = 50000 for the papers' numbers), and for each compare

    (a) the image G draws with its input transform set to a move M      (`G.synthesis.input.transform`)
    (b) the image G draws with the identity transform, moved by M in pixel space

over the pixels where (b) is defined (a mask), as a PSNR in dB for images in [-1, 1] (peak-to-peak 2):

    PSNR = 20 log10(2) - 10 log10(MSE),   MSE = sum_images sum_{c,y,x} mask * (a - b)^2 / sum_images sum mask

i.e. one MSE pooled over every compared pixel of every image (not a mean of per-image PSNRs); identical images
give +inf. Higher is better. The moves:
- EQ-T (`_int`): a translation t = (t_x, t_y), each uniform in [-1/8, 1/8] image widths, rounded to whole pixels;
  (b) shifts the pixels by t * resolution; the mask drops the pixels shifted in from outside.
- EQ-T_frac (`_frac`): the same translation unrounded; (b) resamples with a separable Lanczos kernel
  L(u) = sinc(u) sinc(u / 3) of 6 taps per axis (normalised to sum 1), the windowed ideal (sinc) interpolator;
  the mask keeps the pixels whose 6 x 6 taps all fall inside the image.
- EQ-R: a rotation by an angle uniform in [-pi, pi] about the image centre. A rotation moves frequencies out of
  the square band a pixel grid holds, so both sides are band-limited alike: (b) upsamples 4x with an oriented
  low-pass filter (the band that survives both the input and the rotated output grid), then samples the rotated
  grid bilinearly; (a) is filtered at the original rate with the same band rotated back ("pseudo-rotation", which
  changes its spectrum as a rotation would without moving it). Each filter is the circular convolution of two
  ideal 2-D sinc low-passes (input grid, rotated grid; cutoff 1/2 cycle per pixel) times the same convolution of
  two Lanczos windows sinc(u / 3), designed on a +-64 px grid (steps of 1/4 px for the 4x filter), cropped to
  +-6 px and normalised so that each of its polyphase components sums to 1 (unit DC gain at every output phase).
  The mask keeps pixels whose filter support lies inside the image on both sides.

Sampling, as NVIDIA's does it: images come in groups of 4 (`GROUP`, NVIDIA's batch per GPU) that share one
translation, one fractional translation and one angle, because the input transform is one [3, 3] matrix for the
whole batch; w = mapping(z, c) without truncation; G runs at the precision it was trained in, as in NVIDIA's
metric (its float16 layers on CUDA, float32 elsewhere: the sampler's `force_fp32`), so on a GPU float16 rounding
counts against equivariance just as it does in the published numbers. Image i's z (and class) come from the same
private generator (seed, i) as every other metric's image i (`pipeline.metrics.features.eval_generators`); group
g's moves from a generator of (seed, g). Ranks take contiguous blocks of groups and gather per-image sums in index
order, so the numbers do not depend on the number of ranks; metric `eqtN_int` uses images 0..N-1 (its last group
may be partial), and metrics asked together share one pass.

Contract: the sampler can move its images (`Sampler.can_move`: StyleGAN3's `StyleGAN3Sampler`, whose
`moved(translate, rotate_deg)` context manager sets the generator's input transform and restores the stored one),
and its generator has `img_resolution`, `G.mapping(z, c, truncation_psi=1) -> ws` and `G.synthesis(ws,
noise_mode="const", force_fp32=...) -> images`. Anything else (StyleGAN2, BigGAN: no input to move) is one
`ConfigError` line naming the metrics, before any image is drawn. The stored transform is unchanged afterwards,
also when evaluation fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.metrics.features import (  # the shared stop protocol of every generated-image pass
    StopCheck,
    agree_on_stop,
    eval_generators,
    gather_rows,
    stop_requested,
    world,
)
from pipeline.metrics.spec import EQ_KINDS, MetricSpec
from pipeline.models.sampling import Sampler
from pipeline.ops.upfirdn2d import filter2d, upsample2d

GROUP = 4  # images per input transform: NVIDIA's batch of 4 per GPU
TRANSLATE_MAX = 0.125  # translations uniform in [-1/8, 1/8] image widths per axis
ROTATE_MAX = math.pi  # angles uniform in [-pi, pi] (NVIDIA's rotate_max=1 half-turn)
LANCZOS_A = 3  # Lanczos kernels sinc(u) sinc(u / a): 2a taps per axis for the fractional shift
ROTATE_UP = 4  # the rotation resamples a 4x upsampled image
FILTER_DESIGN_HALF = 64  # the rotation filters are designed on a +-64 px grid (circular convolution by FFT) ...
FILTER_HALF = 2 * LANCZOS_A  # ... and cropped to +-6 px
_MOVES_STREAM = 0xE0  # keeps the moves' random stream apart from the images' (seed, i) generators

Render = Callable[[tuple[float, float], float], Tensor]  # (translate, rotate_deg) -> one group's images


@dataclass(frozen=True)
class Moves:
    """The moves one group of images is scored under (a group shares them: one input transform per batch)."""

    translate_int: tuple[float, float]  # image widths (x right, y down), whole pixels
    translate_frac: tuple[float, float]  # image widths, any value
    angle: float  # radians; positive turns the image as `rotation_matrix(angle)` maps its coordinates


def draw_moves(generator: torch.Generator, resolution: int) -> Moves:
    """One group's moves from its generator. All five numbers are drawn whichever metrics are asked, so a
    group's translation does not change when another metric is added."""
    u = torch.rand(5, generator=generator, dtype=torch.float64)
    # float32 values: G's input transform holds them in float32, so the pixel-space move is exactly G's.
    span = ((u * 2 - 1) * TRANSLATE_MAX).to(torch.float32).to(torch.float64)
    whole = torch.round(span[:2] * resolution) / resolution
    return Moves(
        (float(whole[0]), float(whole[1])),
        (float(span[2]), float(span[3])),
        float((u[4] * 2 - 1) * ROTATE_MAX),
    )


def moves_generator(seed: int, group: int) -> torch.Generator:
    """The private generator of group `group`'s moves: a function of (seed, group) only."""
    state = np.random.SeedSequence([seed, group, _MOVES_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def rotation_matrix(angle: float) -> Tensor:
    """[[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]] (float64): the pixel-space rotation EQ-R applies."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Moving pixels


def sinc(x: Tensor) -> Tensor:
    """sin(pi x) / (pi x), 1 at 0."""
    y = (x * math.pi).abs()
    return torch.where(y < 1e-30, torch.ones_like(x), torch.sin(y) / y.clamp_min(1e-30))


def lanczos_window(x: Tensor, a: int) -> Tensor:
    """sinc(x / a) inside |x| < a, 0 outside."""
    return torch.where(x.abs() < a, sinc(x / a), torch.zeros_like(x))


def shift_integer(x: Tensor, tx: float, ty: float) -> tuple[Tensor, Tensor]:
    """x [N, C, H, W] moved by (round(tx W), round(ty H)) pixels (right, down), and its mask: 0 where the
    pixels came from outside the image (their values are 0 too)."""
    h, w = x.shape[2], x.shape[3]
    ix, iy = round(tx * w), round(ty * h)
    out, mask = torch.zeros_like(x), torch.zeros_like(x)
    if abs(ix) < w and abs(iy) < h:
        out[:, :, max(iy, 0) : h + min(iy, 0), max(ix, 0) : w + min(ix, 0)] = x[
            :, :, max(-iy, 0) : h + min(-iy, 0), max(-ix, 0) : w + min(-ix, 0)
        ]
        mask[:, :, max(iy, 0) : h + min(iy, 0), max(ix, 0) : w + min(ix, 0)] = 1
    return out, mask


def _lanczos_taps(frac: float, a: int) -> tuple[range, list[float]]:
    """Taps k = -(a-1)..a and weights L(k - frac) (sum 1) that interpolate a signal at -frac from its samples."""
    taps = range(-(a - 1), a + 1)
    u = torch.tensor([k - frac for k in taps], dtype=torch.float64)
    weights = sinc(u) * sinc(u / a)
    return taps, (weights / weights.sum()).tolist()


def shift_fractional(x: Tensor, tx: float, ty: float, a: int = LANCZOS_A) -> tuple[Tensor, Tensor]:
    """x [N, C, H, W] moved by (tx W, ty H) pixels with separable Lanczos-`a` interpolation, and its mask.

    With s = i + f (i = floor, 0 <= f < 1) pixels of shift, out[p] = sum_k L(k - f) x[p - i - k] for
    k = -(a-1)..a: the band-limited signal through the samples, read at p - s. Only pixels whose 2a taps all
    fall inside the image are computed (mask 1); the others are 0."""
    h, w = x.shape[2], x.shape[3]
    sx, sy = tx * w, ty * h
    ix, iy = math.floor(sx), math.floor(sy)
    out, mask = torch.zeros_like(x), torch.zeros_like(x)
    x0, x1 = max(ix + a, 0), min(w + ix - (a - 1), w)
    y0, y1 = max(iy + a, 0), min(h + iy - (a - 1), h)
    if x0 >= x1 or y0 >= y1:
        return out, mask
    taps, wx = _lanczos_taps(sx - ix, a)
    _, wy = _lanczos_taps(sy - iy, a)
    rows = sum(c * x[:, :, :, x0 - ix - k : x1 - ix - k] for k, c in zip(taps, wx, strict=True))
    both = sum(c * rows[:, :, y0 - iy - k : y1 - iy - k, :] for k, c in zip(taps, wy, strict=True))
    out[:, :, y0:y1, x0:x1] = both
    mask[:, :, y0:y1, x0:x1] = 1
    return out, mask


def bandlimit_filter(
    mat: Tensor,
    up: int,
    half: int = FILTER_HALF,
    a: int = LANCZOS_A,
    design_half: int = FILTER_DESIGN_HALF,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The oriented low-pass filter [2 half up - 1]^2 (float32, on `device`) for resampling through the 2-D linear
    map `mat[:2, :2]` at `up` samples per pixel: the band of the input pixel grid and of the mapped one (see the
    module docstring). Designed in float64 on a grid of step 1/up covering +-`design_half` px (on `device`: a
    GPU designs the 511 x 511 grid of the 4x filter in about a millisecond, a CPU core in ~0.1 s)."""
    m = mat[:2, :2].to(device=device, dtype=torch.float64)
    n = design_half * up
    u = torch.arange(-(n - 1), n, dtype=torch.float64, device=device) / up  # 2n - 1 samples, 0 in the middle
    yi, xi = torch.meshgrid(u, u, indexing="ij")
    xo, yo = m[0, 0] * xi + m[0, 1] * yi, m[1, 0] * xi + m[1, 1] * yi  # the same points in the mapped grid

    def circular_convolution(p: Tensor, q: Tensor) -> Tensor:  # of two real centred grids, centred
        spectrum = torch.fft.rfft2(torch.fft.ifftshift(p)) * torch.fft.rfft2(torch.fft.ifftshift(q))
        return torch.fft.fftshift(torch.fft.irfft2(spectrum, s=p.shape))

    band = circular_convolution(sinc(xi) * sinc(yi), sinc(xo) * sinc(yo))
    window = circular_convolution(
        lanczos_window(xi, a) * lanczos_window(yi, a), lanczos_window(xo, a) * lanczos_window(yo, a)
    )
    keep = half * up - 1  # taps each side of the centre (index n - 1)
    f = (band * window)[n - 1 - keep : n + keep, n - 1 - keep : n + keep]
    # Polyphase normalisation: tap j feeds output phase j mod up; each phase's taps sum to 1 / up^2 (upsample2d's
    # gain of up^2 makes that 1). A zero row and column make the size a multiple of up, then go again.
    size = 2 * half
    f = F.pad(f, [0, 1, 0, 1]).reshape(size, up, size, up)
    f = f / f.sum(dim=(0, 2), keepdim=True) / up**2
    return f.reshape(size * up, size * up)[:-1, :-1].to(torch.float32)


def rotate(x: Tensor, angle: float, up: int = ROTATE_UP) -> tuple[Tensor, Tensor]:
    """x [N, C, H, W] rotated by `angle` about its centre (output pixel p shows x at rotation_matrix(angle)^-1 p),
    band-limited for both grids, and its mask (1 where the filter's support lies inside x)."""

    h, w = x.shape[2], x.shape[3]
    mat = rotation_matrix(angle)
    f = bandlimit_filter(mat, up, device=x.device)
    p = f.shape[0] // 2
    big = upsample2d(x, f, up=up, padding=p)  # [N, C, up H + 2p, up W + 2p]
    # Output pixel centres (normalised [-1, 1] image coordinates) -> source positions in `big`'s normalised
    # coordinates. upsample2d puts big's sample k at (k - p) / up in pixel units (pixel centres at i + 1/2), half
    # an upsampled pixel left of where grid_sample takes it: add 1 / (2 up) px (1 / (up W) normalised). `big`
    # extends p / up px beyond the image on each side: scale by W / (W + 2p / up).
    inv = torch.linalg.inv(mat)
    theta = torch.stack(
        [
            torch.stack([inv[0, 0], inv[0, 1], 2 * inv[0, 2] + 1 / (up * w)]) * (w / (w + 2 * p / up)),
            torch.stack([inv[1, 0], inv[1, 1], 2 * inv[1, 2] + 1 / (up * h)]) * (h / (h + 2 * p / up)),
        ]
    )
    grid = F.affine_grid(theta[None].to(torch.float32), [1, 1, h, w], align_corners=False).to(x.device)
    out = F.grid_sample(big, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", align_corners=False)
    border = 2 * p + 1  # samples closer to big's edge than the filter's width saw zero padding
    inside = torch.zeros((1, 1, big.shape[2], big.shape[3]), dtype=x.dtype, device=x.device)
    inside[:, :, border:-border, border:-border] = 1
    mask = F.grid_sample(inside, grid, mode="nearest", align_corners=False)
    return out, mask.expand_as(out)


def pseudo_rotate(x: Tensor, angle: float) -> tuple[Tensor, Tensor]:
    """x [N, C, H, W] low-passed to the band `rotate(., angle)` leaves, seen from the rotated grid (so x keeps its
    place), and its mask (1 where the filter's support lies inside x)."""

    f = bandlimit_filter(rotation_matrix(-angle), up=1, device=x.device)
    c = f.shape[0] // 2
    out = filter2d(x, f)
    mask = torch.zeros_like(out)
    mask[:, :, c:-c, c:-c] = 1
    return out, mask


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def image_errors(render: Render, kinds: Sequence[str], moves: Moves) -> Tensor:
    """[n, len(kinds), 2] float64: per image of one group and per kind, (sum of mask * (a - b)^2, sum of mask).

    `render(translate, rotate_deg)` draws the group's images moved by `translate` image widths and turned
    `rotate_deg` degrees counter-clockwise, i.e. as `rotation_matrix(radians(rotate_deg))` maps pixel coordinates."""
    orig = render((0.0, 0.0), 0.0)
    out = []
    for kind in kinds:
        if kind == "eqt_int":
            img = render(moves.translate_int, 0.0)
            ref, mask = shift_integer(orig, *moves.translate_int)
        elif kind == "eqt_frac":
            img = render(moves.translate_frac, 0.0)
            ref, mask = shift_fractional(orig, *moves.translate_frac)
        elif kind == "eqr":
            moved = render((0.0, 0.0), math.degrees(moves.angle))
            ref, ref_mask = rotate(orig, moves.angle)
            img, img_mask = pseudo_rotate(moved, moves.angle)
            mask = ref_mask * img_mask
        else:
            raise ValueError(f"unknown equivariance kind {kind!r}: choose one of {', '.join(EQ_KINDS)}")
        err = ((ref - img).square() * mask).to(torch.float64).sum(dim=(1, 2, 3))
        out.append(torch.stack([err, mask.to(torch.float64).sum(dim=(1, 2, 3))], dim=1))
    return torch.stack(out, dim=1).cpu()


def psnr(sq_error_sum: float, mask_sum: float) -> float:
    """PSNR in dB of images in [-1, 1] from pooled sums: 20 log10(2) - 10 log10(MSE); +inf for MSE 0, NaN when no
    pixel was compared."""
    if mask_sum <= 0:
        return float("nan")
    mse = sq_error_sum / mask_sum
    return math.inf if mse == 0 else 20 * math.log10(2) - 10 * math.log10(mse)


def check_input_transform(sampler: Sampler, names: str) -> None:
    """One `ConfigError` line naming the metrics unless the generator has an input transform."""
    if not sampler.can_move:
        which = f"{sampler.family} generator" if sampler.family else "this generator"
        raise ConfigError(
            f"{names} need(s) a generator with an input transform to translate/rotate its image (StyleGAN3's "
            f"synthesis.input.transform), and the {which} has none: remove it from the metrics"
        )


@torch.no_grad()
def equivariance_metrics(
    sampler: Sampler,
    specs: Sequence[MetricSpec],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    should_stop: StopCheck | None = None,
) -> dict[str, float]:
    """PSNR (dB) of each equivariance metric in `specs` (kinds eqt_int, eqt_frac, eqr), keyed by its name; one pass
    over images 0..max(N)-1 shared by all of them. Every rank of a distributed job calls it together and gets the
    same numbers; `Abandoned` on every rank once `should_stop()`, polled between groups, is true on any rank."""
    if not specs:
        return {}
    names = ", ".join(s.name for s in specs)
    bad = [s.name for s in specs if s.kind not in EQ_KINDS]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not an equivariance metric ({', '.join(EQ_KINDS)})")
    check_input_transform(sampler, names)
    device = torch.device(device)
    G = sampler.G
    resolution = int(G.img_resolution)  # translations round to whole pixels of this grid
    reach = {k: max((s.num_gen for s in specs if s.kind == k), default=0) for k in EQ_KINDS}
    kinds = [k for k in EQ_KINDS if reach[k] > 0]
    num = max(reach.values())
    groups = -(-num // GROUP)
    rank, size = world()
    lo, hi = rank * groups // size, (rank + 1) * groups // size
    fp32 = bool(getattr(sampler, "force_fp32", True))  # StyleGAN samplers: float16 layers on CUDA only
    rows: list[Tensor] = []
    bar = tqdm(total=num, desc="equivariance", unit="img", disable=not progress or rank != 0, leave=False)
    stopped = False
    for g in range(lo, hi):
        if stopped := stop_requested(should_stop):
            break
        first, last = g * GROUP, min((g + 1) * GROUP, num)
        generators = eval_generators(range(first, last), seed)
        z = sampler.latents_from(generators).to(device)
        c = sampler.conditioning.for_eval(generators, device)
        ws = G.mapping(z, c, truncation_psi=1)

        def render(translate: tuple[float, float], rotate_deg: float, ws: Tensor = ws) -> Tensor:
            with sampler.moved(translate, rotate_deg):
                return G.synthesis(ws, noise_mode="const", force_fp32=fp32).to(torch.float32)

        moves = draw_moves(moves_generator(seed, g), resolution)
        active = [k for k in kinds if reach[k] > first]  # a kind whose metrics all end before this group skips it
        errors = image_errors(render, active, moves)  # [n, len(active), 2]
        full = torch.zeros((last - first, len(kinds), 2), dtype=torch.float64)
        full[:, [kinds.index(k) for k in active]] = errors
        rows.append(full.reshape(last - first, -1))
        bar.update((last - first) * size)
    bar.close()
    agree_on_stop(should_stop, stopped)
    local = torch.cat(rows) if rows else torch.zeros((0, 2 * len(kinds)), dtype=torch.float64)
    every = gather_rows(local).reshape(-1, len(kinds), 2)  # image order: ranks hold contiguous blocks of groups
    assert every.shape[0] == num, f"gathered {every.shape[0]} equivariance rows, expected {num}"
    out: dict[str, float] = {}
    for s in specs:
        total = every[: s.num_gen, kinds.index(s.kind)].sum(dim=0)
        out[s.name] = psnr(float(total[0]), float(total[1]))
    return out


__all__ = [
    "FILTER_DESIGN_HALF",
    "FILTER_HALF",
    "GROUP",
    "LANCZOS_A",
    "ROTATE_MAX",
    "ROTATE_UP",
    "TRANSLATE_MAX",
    "Moves",
    "bandlimit_filter",
    "check_input_transform",
    "draw_moves",
    "equivariance_metrics",
    "image_errors",
    "moves_generator",
    "pseudo_rotate",
    "psnr",
    "rotate",
    "rotation_matrix",
    "shift_fractional",
    "shift_integer",
]
