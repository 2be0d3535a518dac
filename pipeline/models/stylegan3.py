"""StyleGAN3 generator (Karras et al., "Alias-Free Generative Adversarial Networks", NeurIPS 2021).

Generator = mapping (z, c -> w, StyleGAN2's mapping network with 2 layers) + synthesis: Fourier features at a
fixed sampling rate (`SynthesisInput`), then `num_layers` modulated convolutions whose nonlinearity is a
*filtered* leaky ReLU (upsample, lrelu, low-pass, downsample: `pipeline.ops.filtered_lrelu`), then a 1x1 toRGB.
The image is treated as a band-limited continuous signal sampled on a grid: every layer has a cutoff f_c, a
minimum stopband f_t, a sampling rate s and a transition half-width f_h, designed from a handful of
hyperparameters (`design_layers`: the paper's flexible layer specifications, Appendix F). Two configurations:

    StyleGAN3-T (translation equivariant): 3x3 convolutions, separable Kaiser filters;
    StyleGAN3-R (also rotation equivariant): 1x1 convolutions, radially symmetric (jinc) downsampling filters in
                 the non-critically sampled layers, twice the channels (`nvlabs_preset`).

There is no per-pixel noise and no learned constant: the input is a set of sinusoids whose frequencies and phases
are fixed buffers, rotated and translated per sample by an affine function of w and, on top of that, by a
user-settable affine `transform` buffer (how a StyleGAN3 image is panned and rotated at inference).

Precision: with `num_fp16_res = k`, layers whose sampling rate s satisfies s * 2**k > img_resolution compute
their activations in float16, on CUDA devices only (NVIDIA's StyleGAN3 rule; on the CPU every layer runs float32),
with `conv_clamp` (256) clamping every layer's output. Parameters, the Fourier features and the output image
stay float32.

Module, parameter and buffer names are NVIDIA's (`networks_stylegan3.py` of NVlabs/stylegan3):
`mapping.fc0.weight`, `mapping.w_avg`, `synthesis.input.{weight,affine.*,transform,freqs,phases}`,
`synthesis.L{i}_{size}_{channels}.{weight,bias,magnitude_ema,up_filter,down_filter,affine.*}`, so that their
state dicts load with `strict=True`. The discriminator is StyleGAN2's (`pipeline.models.stylegan2.Discriminator`
builds from a `StyleGAN3Config`), as in NVIDIA's code. Nothing here knows about training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.signal
import scipy.special
import torch
from torch import Tensor, nn

from pipeline.errors import require
from pipeline.models import stylegan2
from pipeline.models.stylegan2 import DiscriminatorConfig, NoiseMode, StyleGenerator, StyleModelConfig
from pipeline.nn import FullyConnectedLayer
from pipeline.ops import filtered_lrelu, modulated_conv2d

NVLABS_CONFIGS = ("stylegan3-t", "stylegan3-r")
MAGNITUDE_EMA_HALF_LIFE_KIMG = 20.0  # NVIDIA's train.py: beta = 0.5 ** (batch / 20k images)
DEFAULT_MAGNITUDE_EMA_BETA = 0.999  # NVIDIA's SynthesisLayer default, used when no batch size is known


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class MappingConfig(stylegan2.MappingConfig):
    """StyleGAN2's mapping network with StyleGAN3's defaults (NVIDIA's `--map-depth` is 2 for StyleGAN3)."""

    num_layers: int = 2
    lr_multiplier: float = 0.01
    w_avg_beta: float = 0.998


@dataclass
class SynthesisConfig:
    """The synthesis network; defaults are NVIDIA's StyleGAN3-T (`train.py --cfg=stylegan3-t`)."""

    conv_kernel: int = 3  # 3 = StyleGAN3-T, 1 = StyleGAN3-R (the toRGB layer is always 1x1)
    use_radial_filters: bool = False  # jinc downsampling filters in non-critical layers (StyleGAN3-R)
    channel_base: int = 32768  # channels of a layer with cutoff f_c: min(rint(channel_base / 2 / f_c), channel_max)
    channel_max: int = 512
    num_layers: int = 14  # layers between the Fourier features and toRGB
    num_critical: int = 2  # critically sampled layers at the end (f_t = s / 2 ... the sharpest details)
    first_cutoff: float = 2.0  # f_{c,0}
    first_stopband: float = 2**2.1  # f_{t,0}
    last_stopband_rel: float = 2**0.3  # f_{t,N} / f_{c,N}
    margin_size: int = 10  # pixels computed outside the image on each side
    output_scale: float = 0.25  # the image is the toRGB output times this
    filter_size: int = 6  # low-pass taps per sample of the lower rate of an up/downsampling step
    lrelu_upsampling: int = 2  # the nonlinearity runs at this multiple of the layer's higher sampling rate
    conv_clamp: float | None = 256  # clamp every layer's output to +-conv_clamp; null = no clamp
    num_fp16_res: int = 4  # float16 activations (CUDA only) in layers with s * 2**num_fp16_res > resolution

    def validate(self, prefix: str) -> None:
        require(self.conv_kernel >= 1, f"{prefix}.conv_kernel", self.conv_kernel, "must be >= 1 (3 for T, 1 for R)")
        require(self.channel_base >= 1, f"{prefix}.channel_base", self.channel_base, "must be >= 1")
        require(self.channel_max >= 1, f"{prefix}.channel_max", self.channel_max, "must be >= 1")
        require(self.num_layers >= 1, f"{prefix}.num_layers", self.num_layers, "must be >= 1")
        require(
            0 <= self.num_critical < self.num_layers,
            f"{prefix}.num_critical",
            self.num_critical,
            f"must be in [0, num_layers={self.num_layers})",
        )
        require(self.first_cutoff > 0, f"{prefix}.first_cutoff", self.first_cutoff, "must be > 0")
        require(
            self.first_stopband > self.first_cutoff,
            f"{prefix}.first_stopband",
            self.first_stopband,
            f"must be > first_cutoff={self.first_cutoff}",
        )
        require(self.last_stopband_rel > 1, f"{prefix}.last_stopband_rel", self.last_stopband_rel, "must be > 1")
        require(self.margin_size >= 0, f"{prefix}.margin_size", self.margin_size, "must be >= 0")
        require(self.output_scale > 0, f"{prefix}.output_scale", self.output_scale, "must be > 0")
        require(self.filter_size >= 1, f"{prefix}.filter_size", self.filter_size, "must be >= 1")
        require(self.lrelu_upsampling >= 1, f"{prefix}.lrelu_upsampling", self.lrelu_upsampling, "must be >= 1")
        require(self.conv_clamp is None or self.conv_clamp > 0, f"{prefix}.conv_clamp", self.conv_clamp, "must be > 0")
        require(self.num_fp16_res >= 0, f"{prefix}.num_fp16_res", self.num_fp16_res, "must be an integer >= 0")


@dataclass
class StyleGAN3Config(StyleModelConfig):
    """The StyleGAN3 model section. `discriminator` is StyleGAN2's (NVIDIA trains StyleGAN3 with it)."""

    mapping: MappingConfig = field(default_factory=MappingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


def nvlabs_preset(
    cfg: Literal["stylegan3-t", "stylegan3-r"], channel_base: int = 32768, channel_max: int = 512, **kwargs
) -> StyleGAN3Config:
    """The generator NVIDIA's `train.py --cfg=<cfg> --cbase=<channel_base> --cmax=<channel_max>` builds (with
    float16 in the top 4 resolutions and conv_clamp 256); StyleGAN3-R uses 1x1 convolutions, radial filters and
    twice the generator's channel_base and channel_max. kwargs go to `StyleGAN3Config` (z_dim, c_dim, ...)."""
    if cfg not in NVLABS_CONFIGS:
        raise ValueError(f"cfg must be one of {NVLABS_CONFIGS}, got {cfg!r}")
    r = cfg == "stylegan3-r"
    synthesis = SynthesisConfig(
        conv_kernel=1 if r else 3,
        use_radial_filters=r,
        channel_base=channel_base * (2 if r else 1),
        channel_max=channel_max * (2 if r else 1),
    )
    discriminator = DiscriminatorConfig(
        channel_base=channel_base, channel_max=channel_max, conv_clamp=256, num_fp16_res=4
    )
    return StyleGAN3Config(synthesis=synthesis, discriminator=discriminator, **kwargs)


def magnitude_ema_beta(batch_size: int, half_life_kimg: float = MAGNITUDE_EMA_HALF_LIFE_KIMG) -> float:
    """Decay of the layers' input-magnitude EMA for one update per training step of `batch_size` images (the total
    batch over all ranks): beta = 0.5 ** (batch_size / (1000 half_life_kimg)), NVIDIA's half-life of 20 kimg."""
    assert batch_size >= 1 and half_life_kimg > 0
    return 0.5 ** (batch_size / (half_life_kimg * 1000))


# ----------------------------------------------------------------------------------------------------------------
# Filter design


@dataclass(frozen=True)
class LayerSpec:
    """The signal at the output of one synthesis layer. Lengths are measured in units of the output image's side
    (the image is sampled at `img_resolution` samples per unit), frequencies in cycles per unit."""

    cutoff: float  # f_c: the band limit of the signal's content
    stopband: float  # f_t: frequencies above it must be attenuated (by the next low-pass filter)
    sampling_rate: int  # s: samples per unit, a power of two
    half_width: float  # f_h = max(f_t, s / 2) - f_c: half the low-pass filter's transition band
    size: int  # pixels per side, margins included
    channels: int
    critically_sampled: bool  # one of the last num_critical layers: f_c = s / 2 (sharp details, some aliasing)
    use_fp16: bool


def design_layers(img_resolution: int, img_channels: int, s: SynthesisConfig) -> list[LayerSpec]:
    """The output spec of layers L0..L_N (N = num_layers; L_N is toRGB; the Fourier features share L0's spec).

    With exponent e_i = min(i / (N - num_critical), 1) for i = 0..N, f_{c,N} = img_resolution / 2 and
    f_{t,N} = f_{c,N} * last_stopband_rel, cutoffs and stopbands follow geometric progressions that reach the
    image's Nyquist frequency num_critical layers before the end (Karras et al. 2021, Appendix F):

        f_c[i] = f_{c,0} (f_{c,N} / f_{c,0}) ** e_i        f_t[i] = f_{t,0} (f_{t,N} / f_{t,0}) ** e_i
        s[i]   = 2 ** ceil(log2(min(2 f_t[i], img_resolution)))   (the smallest power of two >= 2 f_t, capped)
        f_h[i] = max(f_t[i], s[i] / 2) - f_c[i]
        size[i] = s[i] + 2 margin_size, except the last two layers: img_resolution (no margin)
        channels[i] = rint(min(channel_base / 2 / f_c[i], channel_max)), except toRGB: img_channels
    """
    assert img_resolution >= 1, "img_resolution must be >= 1"
    n = s.num_layers
    last_cutoff = img_resolution / 2
    last_stopband = last_cutoff * s.last_stopband_rel
    exponents = np.minimum(np.arange(n + 1) / (n - s.num_critical), 1)
    cutoffs = s.first_cutoff * (last_cutoff / s.first_cutoff) ** exponents
    stopbands = s.first_stopband * (last_stopband / s.first_stopband) ** exponents
    rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
    half_widths = np.maximum(stopbands, rates / 2) - cutoffs
    sizes = rates + s.margin_size * 2
    sizes[-2:] = img_resolution
    channels = np.rint(np.minimum((s.channel_base / 2) / cutoffs, s.channel_max))
    channels[-1] = img_channels
    specs = []
    for i in range(n + 1):
        specs.append(
            LayerSpec(
                cutoff=float(cutoffs[i]),
                stopband=float(stopbands[i]),
                sampling_rate=int(rates[i]),
                half_width=float(half_widths[i]),
                size=int(sizes[i]),
                channels=int(channels[i]),
                critically_sampled=i >= n - s.num_critical,
                use_fp16=bool(rates[i] * 2**s.num_fp16_res > img_resolution),
            )
        )
    assert all(spec.channels >= 1 for spec in specs), "channel_base is too small: a layer would have no channels"
    assert all(spec.half_width > 0 for spec in specs), "a layer's transition band is empty (check the cutoffs)"
    return specs


def lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False) -> Tensor | None:
    """A float32 low-pass FIR filter with `numtaps` taps at sampling rate `fs` (None for one tap: the identity).

    Separable (1-D, applied along x and y): the ideal low-pass h(t) = 2 f_c sinc(2 f_c t) at t_k = (k - (n-1)/2) / fs
    times a Kaiser window whose beta meets the attenuation a transition band of `width` allows (Kaiser's formulas,
    `scipy.signal.firwin`), normalised to unit DC gain.

    Radial (2-D, rotation-invariant): proportional to the ideal disc low-pass, h(r) = J1(2 pi f_c r) / (pi r)
    (a jinc; its limit at r = 0 is f_c), at r = |(t_j, t_k)|, times the outer product of the same Kaiser window
    with itself, normalised to unit DC gain.
    """
    assert numtaps >= 1
    if numtaps == 1:
        return None
    if not radial:
        taps = scipy.signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs)
        return torch.as_tensor(taps, dtype=torch.float32)
    t = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(t[None, :], t[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where(r > 0, scipy.special.j1(2 * np.pi * cutoff * r) / (np.pi * r), cutoff)
    beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
    window = np.kaiser(numtaps, beta)
    h = h * np.outer(window, window)
    return torch.as_tensor(h / h.sum(), dtype=torch.float32)


def image_transform(translate: tuple[float, float] = (0.0, 0.0), rotate_deg: float = 0.0) -> Tensor:
    """The `SynthesisInput.transform` [3, 3] (float32) that shows the image moved by `translate` (x right, y down,
    in units of the image's side: 0.5 moves it by half its width) and rotated by `rotate_deg` degrees
    counter-clockwise about its centre (as displayed, rows top to bottom): the inverse, computed in float64, of

        M = [[cos a, sin a, t_x], [-sin a, cos a, t_y], [0, 0, 1]],

    the matrix NVIDIA's gen_images.py inverts for its `--translate` and `--rotate`."""
    a = math.radians(rotate_deg)
    m = torch.tensor(
        [[math.cos(a), math.sin(a), translate[0]], [-math.sin(a), math.cos(a), translate[1]], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    return torch.linalg.inv(m).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Synthesis


class SynthesisInput(nn.Module):
    """Fourier features: `channels` sinusoids sampled on a size x size grid at `sampling_rate`, mixed by a learned
    [C, C] matrix.

    Buffers: freqs [C, 2] drawn uniformly in the disc |f| <= bandwidth, phases [C] uniform in [-1/2, 1/2), and the
    user's `transform` [3, 3] (identity by default), an affine map applied to the sampling grid: set it to the
    inverse of the desired image transform to translate/rotate the output. Per sample, w gives
    t = affine(w) = (r_c, r_s, t_x, t_y), normalised by |(r_c, r_s)|, and the grid transform is

        T = R T_t U,  R = [[r_c, -r_s, 0], [r_s, r_c, 0], [0, 0, 1]],  T_t = [[1, 0, -t_x], [0, 1, -t_y], [0, 0, 1]]

    (U the user transform). Frequencies and phases become f' = f T[:2, :2] and phi' = phi + f . T[:2, 2]; at grid
    point p_{jk} = ((k + 1/2 - size/2) / s, (j + 1/2 - size/2) / s) the feature of channel c is

        x[c, j, k] = a_c sin(2 pi (f'_c . p_{jk} + phi'_c)),  a_c = clamp(1 - (|f'_c| - bw) / (s/2 - bw), 0, 1),

    where a_c fades out frequencies that U pushed beyond the band (|f'| > bw), and the output is
    weight / sqrt(C) applied to the channels of x. `affine` starts at the identity map (zero weight, bias
    (1, 0, 0, 0)).
    """

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float) -> None:
        super().__init__()
        self.w_dim, self.channels, self.size = w_dim, channels, size
        self.sampling_rate, self.bandwidth = sampling_rate, bandwidth
        # Uniform in the disc: angle uniform, radius = bandwidth * sqrt(u) with u uniform.
        angle = torch.rand([channels], dtype=torch.float64) * (2 * math.pi)
        radius = bandwidth * torch.rand([channels], dtype=torch.float64).sqrt()
        freqs = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1).to(torch.float32)
        phases = torch.rand([channels]) - 0.5

        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.affine = FullyConnectedLayer(w_dim, 4)
        with torch.no_grad():
            self.affine.weight.zero_()
            self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.register_buffer("transform", torch.eye(3, 3))
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)

    def forward(self, w: Tensor) -> Tensor:
        assert w.ndim == 2 and w.shape[1] == self.w_dim, f"expected w [N, {self.w_dim}]"
        n = w.shape[0]
        t = self.affine(w)  # [N, 4]
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        r_c, r_s, t_x, t_y = t.unbind(dim=1)
        zero, one = torch.zeros_like(r_c), torch.ones_like(r_c)
        rotate = torch.stack([r_c, -r_s, zero, r_s, r_c, zero, zero, zero, one], dim=1).reshape(n, 3, 3)
        translate = torch.stack([one, zero, -t_x, zero, one, -t_y, zero, zero, one], dim=1).reshape(n, 3, 3)
        transforms = rotate @ translate @ self.transform.unsqueeze(0)  # [N, 3, 3]

        phases = self.phases.unsqueeze(0) + (self.freqs.unsqueeze(0) @ transforms[:, :2, 2:]).squeeze(2)  # [N, C]
        freqs = self.freqs.unsqueeze(0) @ transforms[:, :2, :2]  # [N, C, 2]
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)

        coords = (torch.arange(self.size, device=w.device, dtype=torch.float32) + (0.5 - self.size / 2)) / float(
            self.sampling_rate
        )
        gx = coords.reshape(1, 1, -1, 1)  # [1, 1, W, 1]
        gy = coords.reshape(1, -1, 1, 1)  # [1, H, 1, 1]
        fx, fy = freqs[:, None, None, :, 0], freqs[:, None, None, :, 1]  # [N, 1, 1, C]
        x = gx * fx + gy * fy + phases[:, None, None, :]  # [N, H, W, C]
        x = torch.sin(x * (2 * math.pi)) * amplitudes[:, None, None, :]
        x = x @ (self.weight / math.sqrt(self.channels)).t()
        x = x.permute(0, 3, 1, 2)  # [N, C, H, W]
        assert x.shape == (n, self.channels, self.size, self.size)
        return x

    def extra_repr(self) -> str:
        return (
            f"w_dim={self.w_dim}, channels={self.channels}, size={self.size}, "
            f"sampling_rate={self.sampling_rate:g}, bandwidth={self.bandwidth:g}"
        )


class SynthesisLayer(nn.Module):
    """One alias-free layer: modulated conv, then bias + filtered leaky ReLU between two sampling rates.

    With input x [N, I, in_size, in_size] and w [N, w_dim]:

        1. input gain: g = magnitude_ema ** -1/2, where magnitude_ema tracks E[x^2] during training
           (ema <- lerp(mean(x^2), ema, beta) on calls with update_emas=True, before g is used);
        2. styles s = affine(w) (toRGB: times 1 / sqrt(I k^2));
        3. y = modulated_conv2d(g x, weight, s) with padding k - 1 (a 'full' convolution: the margin grows by
           k - 1 and the filters below crop it), demodulated except in toRGB; as NVIDIA, weight and styles are
           first scaled to unit RMS (weight per output channel, styles over the batch), which demodulation
           cancels up to its epsilon;
        4. out = filtered_lrelu(y, up_filter, down_filter, bias, up, down, padding, gain=sqrt(2), slope=0.2,
           clamp=conv_clamp): upsample to tmp_rate = max(s_in, s_out) * lrelu_upsampling with a low-pass at the
           input's cutoff, leaky ReLU there, low-pass at the output's cutoff and downsample to s_out. toRGB is
           linear (gain 1, slope 1, no resampling).

    Filters: up_filter has filter_size * up taps (None when up = 1 or toRGB), cutoff f_c,in, transition
    2 f_h,in; down_filter has filter_size * down taps, cutoff f_c,out, transition 2 f_h,out, radially symmetric
    when use_radial_filters and the layer is not critically sampled. Padding (in upsampled pixels) makes the
    output exactly out_size:

        total = (out_size - 1) down + 1 - (in_size + k - 1) up + up_taps + down_taps - 2
        pad_lo = (total + up) // 2, pad_hi = total - pad_lo

    the `+ up` shifting the zero-inserted samples so that pixel centres (at half-integers) of both grids line up
    (the paper's symmetric interpretation of the sample grid, Appendix C.3).
    """

    def __init__(
        self,
        w_dim: int,
        spec_in: LayerSpec,
        spec_out: LayerSpec,
        is_torgb: bool,
        conv_kernel: int = 3,
        filter_size: int = 6,
        lrelu_upsampling: int = 2,
        use_radial_filters: bool = False,
        conv_clamp: float | None = 256,
        magnitude_ema_beta: float = DEFAULT_MAGNITUDE_EMA_BETA,
    ) -> None:
        super().__init__()
        self.w_dim = w_dim
        self.is_torgb = is_torgb
        self.is_critically_sampled = spec_out.critically_sampled
        self.use_fp16 = spec_out.use_fp16
        self.in_channels, self.out_channels = spec_in.channels, spec_out.channels
        self.in_size, self.out_size = spec_in.size, spec_out.size
        self.in_sampling_rate, self.out_sampling_rate = spec_in.sampling_rate, spec_out.sampling_rate
        self.in_cutoff, self.out_cutoff = spec_in.cutoff, spec_out.cutoff
        self.in_half_width, self.out_half_width = spec_in.half_width, spec_out.half_width
        self.tmp_sampling_rate = max(self.in_sampling_rate, self.out_sampling_rate) * (
            1 if is_torgb else lrelu_upsampling
        )
        self.conv_kernel = 1 if is_torgb else conv_kernel
        self.conv_clamp = conv_clamp
        self.magnitude_ema_beta = magnitude_ema_beta
        self.weight_gain = 1 / math.sqrt(self.in_channels * self.conv_kernel**2)  # toRGB's style scale

        self.affine = FullyConnectedLayer(w_dim, self.in_channels, bias_init=1)
        self.weight = nn.Parameter(
            torch.randn([self.out_channels, self.in_channels, self.conv_kernel, self.conv_kernel])
        )
        self.bias = nn.Parameter(torch.zeros([self.out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))

        self.up_factor = self.tmp_sampling_rate // self.in_sampling_rate
        self.down_factor = self.tmp_sampling_rate // self.out_sampling_rate
        assert self.in_sampling_rate * self.up_factor == self.tmp_sampling_rate, "sampling rates must nest"
        assert self.out_sampling_rate * self.down_factor == self.tmp_sampling_rate, "sampling rates must nest"
        self.up_taps = filter_size * self.up_factor if self.up_factor > 1 and not is_torgb else 1
        self.down_taps = filter_size * self.down_factor if self.down_factor > 1 and not is_torgb else 1
        self.down_radial = use_radial_filters and not self.is_critically_sampled
        self.register_buffer(
            "up_filter",
            lowpass_filter(self.up_taps, self.in_cutoff, 2 * self.in_half_width, self.tmp_sampling_rate),
        )
        self.register_buffer(
            "down_filter",
            lowpass_filter(
                self.down_taps, self.out_cutoff, 2 * self.out_half_width, self.tmp_sampling_rate, self.down_radial
            ),
        )
        total = (self.out_size - 1) * self.down_factor + 1
        total -= (self.in_size + self.conv_kernel - 1) * self.up_factor
        total += self.up_taps + self.down_taps - 2
        pad_lo = (total + self.up_factor) // 2
        pad_hi = total - pad_lo
        self.padding = [pad_lo, pad_hi, pad_lo, pad_hi]  # x0, x1, y0, y1

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        fused_modconv: bool | None = None,
        force_fp32: bool = False,
        update_emas: bool = False,
    ) -> Tensor:
        n = x.shape[0]
        assert x.ndim == 4 and x.shape[1:] == (self.in_channels, self.in_size, self.in_size), (
            f"expected x [N, {self.in_channels}, {self.in_size}, {self.in_size}], got {list(x.shape)}"
        )
        assert w.shape == (n, self.w_dim), f"expected w [{n}, {self.w_dim}], got {list(w.shape)}"
        if update_emas:
            magnitude = x.detach().to(torch.float32).square().mean()
            self.magnitude_ema.copy_(magnitude.lerp(self.magnitude_ema, self.magnitude_ema_beta))
        input_gain = self.magnitude_ema.rsqrt()

        styles = self.affine(w)
        weight = self.weight
        if self.is_torgb:
            styles = styles * self.weight_gain
        else:
            weight = weight * weight.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
            styles = styles * styles.square().mean().rsqrt()
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        if fused_modconv is None:
            fused_modconv = not self.training  # as StyleGAN2: grouped convs for inference, cheaper grads otherwise
        x = x.to(dtype) * input_gain.to(dtype)
        x = modulated_conv2d(
            x, weight, styles, padding=self.conv_kernel - 1, demodulate=not self.is_torgb, fused_modconv=fused_modconv
        )
        x = filtered_lrelu(
            x,
            self.up_filter,
            self.down_filter,
            self.bias.to(dtype),
            up=self.up_factor,
            down=self.down_factor,
            padding=self.padding,
            gain=1.0 if self.is_torgb else math.sqrt(2),
            slope=1.0 if self.is_torgb else 0.2,
            clamp=self.conv_clamp,
        )
        assert x.shape == (n, self.out_channels, self.out_size, self.out_size) and x.dtype == dtype
        return x

    def extra_repr(self) -> str:
        return (
            f"w_dim={self.w_dim}, is_torgb={self.is_torgb}, is_critically_sampled={self.is_critically_sampled}, "
            f"use_fp16={self.use_fp16}, in_sampling_rate={self.in_sampling_rate:g}, "
            f"out_sampling_rate={self.out_sampling_rate:g}, in_cutoff={self.in_cutoff:g}, "
            f"out_cutoff={self.out_cutoff:g}, in_half_width={self.in_half_width:g}, "
            f"out_half_width={self.out_half_width:g}, in_size={self.in_size}, out_size={self.out_size}, "
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, up={self.up_factor}, "
            f"down={self.down_factor}, down_radial={self.down_radial}"
        )


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R] (num_ws = num_layers + 2: the input, the
    num_layers layers and toRGB each take one w)."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        cfg: SynthesisConfig | None = None,
        magnitude_ema_beta: float = DEFAULT_MAGNITUDE_EMA_BETA,
    ) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else SynthesisConfig()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_layers = cfg.num_layers
        self.num_ws = cfg.num_layers + 2
        self.output_scale = cfg.output_scale
        self.specs = design_layers(img_resolution, img_channels, cfg)
        first = self.specs[0]
        self.input = SynthesisInput(w_dim, first.channels, first.size, first.sampling_rate, first.cutoff)
        self.layer_names: list[str] = []
        for idx, spec in enumerate(self.specs):
            layer = SynthesisLayer(
                w_dim,
                self.specs[max(idx - 1, 0)],
                spec,
                is_torgb=idx == cfg.num_layers,
                conv_kernel=cfg.conv_kernel,
                filter_size=cfg.filter_size,
                lrelu_upsampling=cfg.lrelu_upsampling,
                use_radial_filters=cfg.use_radial_filters,
                conv_clamp=cfg.conv_clamp,
                magnitude_ema_beta=magnitude_ema_beta,
            )
            name = f"L{idx}_{spec.size}_{spec.channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)

    def layers(self) -> list[SynthesisLayer]:
        return [getattr(self, name) for name in self.layer_names]

    def forward(
        self,
        ws: Tensor,
        noise_mode: NoiseMode = "random",  # StyleGAN3 has no noise; accepted for the StyleGAN sampler
        fused_modconv: bool | None = None,
        force_fp32: bool = False,
        update_emas: bool = False,
    ) -> Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (
            f"expected ws [N, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}"
        )
        ws_iter = iter(ws.to(torch.float32).unbind(dim=1))
        x = self.input(next(ws_iter))
        for layer, w in zip(self.layers(), ws_iter, strict=True):
            x = layer(x, w, fused_modconv=fused_modconv, force_fp32=force_fp32, update_emas=update_emas)
        if self.output_scale != 1:
            x = x * self.output_scale
        assert x.shape[1:] == (self.img_channels, self.img_resolution, self.img_resolution)
        return x.to(torch.float32)


class Generator(StyleGenerator):
    """StyleGAN3's generator: the alias-free synthesis network behind StyleGAN2's mapping network.

    magnitude_ema_beta: decay of every layer's input-magnitude EMA per update_emas=True call; training builders
    pass `magnitude_ema_beta(batch_size)` (NVIDIA's rule), the default is NVIDIA's layer default 0.999.
    """

    def __init__(
        self, cfg: StyleGAN3Config, img_resolution: int, magnitude_ema_beta: float = DEFAULT_MAGNITUDE_EMA_BETA
    ) -> None:
        synthesis = SynthesisNetwork(
            cfg.w_dim, img_resolution, cfg.img_channels, cfg.synthesis, magnitude_ema_beta=magnitude_ema_beta
        )
        super().__init__(cfg, img_resolution, synthesis)


__all__ = [
    "DEFAULT_MAGNITUDE_EMA_BETA",
    "NVLABS_CONFIGS",
    "Generator",
    "LayerSpec",
    "MappingConfig",
    "StyleGAN3Config",
    "SynthesisConfig",
    "SynthesisInput",
    "SynthesisLayer",
    "SynthesisNetwork",
    "design_layers",
    "image_transform",
    "lowpass_filter",
    "magnitude_ema_beta",
    "nvlabs_preset",
]
