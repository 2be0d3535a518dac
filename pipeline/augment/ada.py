"""ADA: the adaptive discriminator augmentation of StyleGAN2-ADA (Karras et al. 2020), written from the paper.

Every operation is applied to each image independently with probability `mult * p` (mult is 1 for the enabled
operations of a pipe, 0 otherwise), so at p < 1 D still sees un-augmented images and, because every operation is
invertible in distribution ("non-leaking"), G cannot learn to produce augmented images.

Geometric operations (coordinates: pixel centres, origin at the image centre, x right, y down). Each draws a
per-sample 3x3 homogeneous matrix A; the pipe keeps the inverse G_inv = A_1^-1 A_2^-1 ... which maps an output
pixel to the input position it is read from:
- xflip: x -> -x with probability 1/2.
- rotate90: rotation by k * 90 degrees, k uniform in {0, 1, 2, 3}.
- xint: translation by round(t * size) pixels, t ~ U(-xint_max, xint_max) per axis.
- scale: isotropic scaling by 2^N(0, scale_std^2).
- rotate: rotation by U(-pi, pi) * rotate_max, once before and once after `aniso`, each with probability
  1 - sqrt(1 - p), so that P(at least one rotation) = p.
- aniso: scaling by (s, 1/s), s = 2^N(0, aniso_std^2).
- xfrac: translation by N(0, xfrac_std^2) * size (part of NVIDIA's `bgc` set).
The composed transform is executed once: reflect-pad the image by as much as the transformed corners need,
upsample 2x with the Symlet-6 wavelet low-pass filter, bilinearly resample the padded, upsampled image with
`grid_sample` at G_inv of every output position, then low-pass with the same filter (flipped) and decimate 2x.
The orthogonal wavelet makes upsample + downsample an exact identity, so the only loss is the bilinear resampling
at 2x, i.e. well below the image's Nyquist rate.

Colour operations (on [r, g, b, 1] with a per-sample 4x4 matrix C, out = C @ in; v = (1, 1, 1, 0) / sqrt(3) the
luma axis):
- brightness: add b ~ N(0, brightness_std^2) to every channel.
- contrast: multiply by 2^N(0, contrast_std^2).
- lumaflip: Householder reflection I - 2 v v^T (inverts luma, keeps chroma) with probability 1/2.
- hue: rotation about v by U(-pi, pi) * hue_max.
- saturation: v v^T + (I - v v^T) * 2^N(0, saturation_std^2) (scales chroma, keeps luma).
Single-channel images use the mean row of C (a gain and an offset); hue and saturation do not apply to them.

All of it is linear in the image for fixed random parameters, hence differentiable (twice) with respect to the
images. Numbers (probability multipliers, standard deviations, the filter) follow NVIDIA's public defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment.base import Augment
from pipeline.ops import downsample2d, setup_filter, upsample2d

# Symlet-6 orthogonal wavelet low-pass decomposition filter (12 taps; standard published coefficients).
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)

GEOMETRIC_OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOR_OPS = ("brightness", "contrast", "lumaflip", "hue", "saturation")


@dataclass(frozen=True)
class AdaOps:
    """Probability multipliers (0 = off, 1 = with probability p) and magnitudes of the ADA operations."""

    xflip: float = 0.0
    rotate90: float = 0.0
    xint: float = 0.0
    scale: float = 0.0
    rotate: float = 0.0
    aniso: float = 0.0
    xfrac: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    lumaflip: float = 0.0
    hue: float = 0.0
    saturation: float = 0.0
    xint_max: float = 0.125  # integer translation range, fraction of the image size
    scale_std: float = 0.2  # log2 std of isotropic scaling
    rotate_max: float = 1.0  # rotation range, 1 = full circle
    aniso_std: float = 0.2  # log2 std of anisotropic scaling
    xfrac_std: float = 0.125  # std of fractional translation, fraction of the image size
    brightness_std: float = 0.2
    contrast_std: float = 0.5  # log2 std
    hue_max: float = 1.0  # hue rotation range, 1 = full circle
    saturation_std: float = 1.0  # log2 std

    @classmethod
    def only(cls, *names: str, **magnitudes: float) -> AdaOps:
        """The named operations at multiplier 1 (e.g. `AdaOps.only("xflip", "hue")`), optional magnitudes."""
        unknown = [n for n in names if n not in GEOMETRIC_OPS + COLOR_OPS]
        if unknown:
            raise ValueError(f"unknown ADA operation(s) {unknown}; known: {', '.join(GEOMETRIC_OPS + COLOR_OPS)}")
        return replace(cls(), **{n: 1.0 for n in names}, **magnitudes)

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if f.name in GEOMETRIC_OPS + COLOR_OPS and getattr(self, f.name) > 0]


_BLIT = ("xflip", "rotate90", "xint")
_GEOM = ("scale", "rotate", "aniso", "xfrac")
_COLOR = COLOR_OPS
ADA_PIPES: dict[str, tuple[str, ...]] = {
    "blit": _BLIT,
    "geom": _GEOM,
    "color": _COLOR,
    "bg": _BLIT + _GEOM,
    "bgc": _BLIT + _GEOM + _COLOR,
}


# ----------------------------------------------------------------------------------------------------------------
# Per-sample homogeneous matrices. Every argument is a tensor of shape [N] (or a float); the result is [N, k, k].


def _stack_matrix(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    elems = [e if isinstance(e, Tensor) else torch.full_like(like, float(e)) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(*like.shape, len(rows), len(rows[0]))


def translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: Tensor) -> Tensor:
    """Counter-clockwise in a y-up frame (clockwise on screen, where y points down)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return _stack_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def translate3d(t: Tensor) -> Tensor:
    return _stack_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s: Tensor) -> Tensor:
    return _stack_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def _embed3(m: Tensor) -> Tensor:
    """[N, 3, 3] linear colour maps -> [N, 4, 4] homogeneous ones."""
    out = torch.zeros(m.shape[0], 4, 4, dtype=m.dtype, device=m.device)
    out[:, :3, :3] = m
    out[:, 3, 3] = 1
    return out


def cross_matrix(axis: Tensor) -> Tensor:
    """[a]_x, the matrix of v -> a x v, for a 3-vector a."""
    zero = axis.new_zeros(())
    ax, ay, az = axis.unbind()
    return torch.stack([zero, -az, ay, az, zero, -ax, -ay, ax, zero]).reshape(3, 3)


def rotate_about(axis: Tensor, theta: Tensor) -> Tensor:
    """Rotation by theta about the unit 3-vector `axis` (Rodrigues: cI + s[axis]_x + (1 - c) axis axis^T)."""
    axis = axis.to(theta)
    eye = torch.eye(3, dtype=theta.dtype, device=theta.device)
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    return _embed3(c * eye + s * cross_matrix(axis) + (1 - c) * torch.outer(axis, axis))


# ----------------------------------------------------------------------------------------------------------------


def _refresh_host_p(module: AdaAugment, _incompatible_keys: object) -> None:
    module._sync_host_p()


class AdaAugment(Augment):
    """The ADA pipe with a probability p that `update` moves towards a target r_t (or keeps fixed).

    p adaptation (paper, section 3): after every `interval` steps of N images each,
    p <- clip(p + sign(r_t - target) * interval * N / (ada_kimg * 1000), 0, 1), so p can cross [0, 1] in
    `ada_kimg` thousand images. (NVIDIA leaves p unbounded above; values over 1 act like 1 but take longer to
    come back down, so we cap.)
    """

    def __init__(
        self,
        ops: AdaOps,
        p: float = 0.0,
        target: float | None = 0.6,
        interval: int = 4,
        ada_kimg: float = 500,
    ) -> None:
        super().__init__(interval)
        if not 0 <= p <= 1:
            raise ValueError(f"ADA p must be in [0, 1], got {p}")
        self.ops = ops
        self.target = target
        self.ada_kimg = float(ada_kimg)
        self._geometric = any(getattr(ops, n) > 0 for n in GEOMETRIC_OPS)
        self._color = any(getattr(ops, n) > 0 for n in COLOR_OPS)
        self.register_buffer("p", torch.tensor(float(p)))
        # A host copy of p: the probabilities are Python floats, so augmenting never waits for the device.
        self._p = float(p)
        self.register_load_state_dict_post_hook(_refresh_host_p)  # a named function: the module stays picklable
        self.register_buffer("filter_geom", setup_filter(list(SYM6)), persistent=False)
        self.register_buffer("luma_axis", torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3), persistent=False)

    # -- p ---------------------------------------------------------------------------------------------------

    @property
    def p_value(self) -> float:
        return self._p

    def set_p(self, p: float) -> None:
        self._p = float(p)
        self.p.fill_(self._p)

    def _sync_host_p(self) -> None:
        self._p = float(self.p)

    def update(self, rt: float, nimg: int) -> None:
        if self.target is None:
            return
        direction = (rt > self.target) - (rt < self.target)
        self.set_p(min(max(self._p + direction * nimg / (self.ada_kimg * 1000), 0.0), 1.0))

    def log_values(self) -> dict[str, Tensor]:
        return {**super().log_values(), "Augment/p": self.p.detach().clone()}

    def extra_repr(self) -> str:
        return f"ops={self.ops.enabled()}, p={self._p:.4f}, target={self.target}, ada_kimg={self.ada_kimg}"

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"ADA expects images [N, C, H, W], got shape {list(images.shape)}")
        if self._p == 0 or not (self._geometric or self._color):
            return images  # exactly the identity, not an almost-identity resampling
        # float64 stays float64 (gradcheck); everything else runs in float32, also under autocast: bfloat16 sampling
        # positions would be off by pixels at high resolution, and 16-bit transform matrices compound their errors.
        work = torch.float64 if images.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.to(work)
            if self._geometric:
                x = self._resample(x, self._sample_geometric(x.shape[0], x.shape[2], x.shape[3], x))
            if self._color:
                x = self._apply_color(x, self._sample_color(x.shape[0], x.shape[1], x))
        return x.to(images.dtype)

    def _gate(self, prob: float | Tensor, values: Tensor, identity: float) -> Tensor:
        """Per sample: `values` with probability `prob`, else the identity value."""
        draw = torch.rand(values.shape[0], *[1] * (values.ndim - 1), dtype=values.dtype, device=values.device)
        return torch.where(draw < prob, values, torch.full_like(values, identity))

    def _sample_geometric(self, n: int, h: int, w: int, like: Tensor) -> Tensor:
        o, p = self.ops, self._p
        opts = dict(dtype=like.dtype, device=like.device)
        g_inv = torch.eye(3, **opts).expand(n, 3, 3)
        one = torch.ones(n, **opts)

        if o.xflip > 0:
            flip = self._gate(o.xflip * p, torch.floor(torch.rand(n, **opts) * 2), 0)
            g_inv = g_inv @ scale2d(1 - 2 * flip, one)  # its own inverse
        if o.rotate90 > 0:
            quarter = self._gate(o.rotate90 * p, torch.floor(torch.rand(n, **opts) * 4), 0)
            g_inv = g_inv @ rotate2d(-math.pi / 2 * quarter)
        if o.xint > 0:
            t = (torch.rand(n, 2, **opts) * 2 - 1) * o.xint_max
            t = self._gate(o.xint * p, t, 0)
            g_inv = g_inv @ translate2d(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h))
        if o.scale > 0:
            s = self._gate(o.scale * p, torch.exp2(torch.randn(n, **opts) * o.scale_std), 1)
            g_inv = g_inv @ scale2d(1 / s, 1 / s)
        # Two chances at rotation (around the anisotropic scaling) so that P(any rotation) = rotate * p.
        p_rot = 1 - math.sqrt(min(max(1 - o.rotate * p, 0.0), 1.0))
        if o.rotate > 0:
            theta = self._gate(p_rot, (torch.rand(n, **opts) * 2 - 1) * math.pi * o.rotate_max, 0)
            g_inv = g_inv @ rotate2d(-theta)
        if o.aniso > 0:
            s = self._gate(o.aniso * p, torch.exp2(torch.randn(n, **opts) * o.aniso_std), 1)
            g_inv = g_inv @ scale2d(1 / s, s)
        if o.rotate > 0:
            theta = self._gate(p_rot, (torch.rand(n, **opts) * 2 - 1) * math.pi * o.rotate_max, 0)
            g_inv = g_inv @ rotate2d(-theta)
        if o.xfrac > 0:
            t = self._gate(o.xfrac * p, torch.randn(n, 2, **opts) * o.xfrac_std, 0)
            g_inv = g_inv @ translate2d(-t[:, 0] * w, -t[:, 1] * h)
        return g_inv

    def _resample(self, x: Tensor, g_inv: Tensor) -> Tensor:
        """Execute output -> input map `g_inv` [N, 3, 3] (centred pixel coordinates) on x [N, C, H, W]."""
        n, c, h, w = x.shape
        f = self.filter_geom
        pad = f.shape[0] // 4  # filter support in input pixels on each side of the 2x up/down round trip

        # Reflect-pad enough that every output pixel (and the filters around it) reads real image content.
        cx, cy = (w - 1) / 2, (h - 1) / 2
        corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], dtype=x.dtype, device=x.device)
        reach = (g_inv @ corners)[:, :2, :]  # [N, xy, corner] input positions of the output corners
        beyond = torch.stack(
            [(-reach[:, 0]).max() - cx, (-reach[:, 1]).max() - cy, reach[:, 0].max() - cx, reach[:, 1].max() - cy]
        )
        limit = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=x.dtype, device=x.device)
        # F.pad(mode="reflect") allows at most size - 1; one host sync for the four amounts.
        mx0, my0, mx1, my1 = (int(v) for v in (beyond + 2 * pad).clamp(min=0).minimum(limit).ceil().tolist())
        x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")
        x = upsample2d(x, f, up=2)

        # Normalised grid coordinates (align_corners=False: -1 and 1 are the outer pixel edges). The output
        # canvas is the image plus `pad` pixels on each side (cropped by the downsampling), in 2x pixels.
        out_h, out_w = 2 * (h + 2 * pad), 2 * (w + 2 * pad)
        ones = torch.ones(n, dtype=x.dtype, device=x.device)
        to_pixels = scale2d(ones * (w / 2 + pad), ones * (h / 2 + pad))  # output grid -> centred pixels
        # The padded image's centre sits (mx1 - mx0) / 2 from the original's; then centred pixels -> its grid.
        to_padded = translate2d(ones * (mx0 - mx1) / 2, ones * (my0 - my1) / 2)
        to_grid = scale2d(ones * 2 / (w + mx0 + mx1), ones * 2 / (h + my0 + my1))
        # The Symlet filter is not symmetric: its 2x upsampling delays the content by about half a 2x pixel
        # (a quarter input pixel). Conjugating by that delay keeps flips and quarter turns centred on the image and
        # landing on sample positions; translations are unaffected.
        delay, undelay = translate2d(ones * -0.25, ones * -0.25), translate2d(ones * 0.25, ones * 0.25)
        theta = to_grid @ to_padded @ delay @ g_inv @ undelay @ to_pixels
        grid = F.affine_grid(theta[:, :2, :], [n, c, out_h, out_w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return downsample2d(x, f, down=2, padding=-2 * pad, flip_filter=True)

    def _sample_color(self, n: int, channels: int, like: Tensor) -> Tensor:
        o, p = self.ops, self._p
        opts = dict(dtype=like.dtype, device=like.device)
        v = self.luma_axis.to(like.dtype)
        v4 = torch.cat([v, v.new_zeros(1)])
        eye4 = torch.eye(4, **opts)
        luma = torch.outer(v4, v4)  # projection onto the luma axis
        color = eye4.expand(n, 4, 4)

        if o.brightness > 0:
            b = self._gate(o.brightness * p, torch.randn(n, **opts) * o.brightness_std, 0)
            color = translate3d(b) @ color
        if o.contrast > 0:
            k = self._gate(o.contrast * p, torch.exp2(torch.randn(n, **opts) * o.contrast_std), 1)
            color = scale3d(k) @ color
        if o.lumaflip > 0:
            flip = self._gate(o.lumaflip * p, torch.floor(torch.rand(n, **opts) * 2), 0)
            color = (eye4 - 2 * luma * flip[:, None, None]) @ color
        if o.hue > 0 and channels > 1:
            theta = self._gate(o.hue * p, (torch.rand(n, **opts) * 2 - 1) * math.pi * o.hue_max, 0)
            color = rotate_about(v, theta) @ color
        if o.saturation > 0 and channels > 1:
            s = self._gate(o.saturation * p, torch.exp2(torch.randn(n, **opts) * o.saturation_std), 1)
            color = (luma + (eye4 - luma) * s[:, None, None]) @ color
        return color

    @staticmethod
    def _apply_color(x: Tensor, color: Tensor) -> Tensor:
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        if c == 3:
            flat = color[:, :3, :3] @ flat + color[:, :3, 3:]
        elif c == 1:
            # Grey images: the average output channel of a grey input (r = g = b = x) is gain * x + offset.
            mean_row = color[:, :3, :].mean(dim=1)  # [N, 4]
            flat = flat * mean_row[:, :3].sum(dim=1)[:, None, None] + mean_row[:, 3][:, None, None]
        else:
            raise ValueError(f"ADA colour operations need 1 or 3 channels, got {c}; use a geometric-only pipe")
        return flat.reshape(n, c, h, w)
