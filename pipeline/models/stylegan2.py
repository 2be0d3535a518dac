"""StyleGAN2 networks (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020).

Generator = mapping (z, c -> w, broadcast to `num_ws` style vectors) + synthesis (a learned 4x4 constant, then one
block per resolution of two modulated 3x3 convs with per-pixel noise, and a 1x1 toRGB). Discriminator = one
block per resolution from `img_resolution` down to 8, then an epilogue at 4x4 with minibatch-stddev, a conv,
two fully connected layers and, for conditional models, a projection onto an embedding of c.

Mixed precision (NVIDIA's recipe, StyleGAN2-ADA): with `num_fp16_res = k > 0`, the blocks of the k highest
resolutions (but never below 8x8) compute their activations in float16 while parameters, the image (skip/toRGB)
path, the mapping network and D's 4x4 epilogue stay float32; pair it with `conv_clamp: 256`, which clamps conv
outputs so that float16 cannot overflow. No loss scaling is needed: parameter gradients are float32 and
non-finite gradients are zeroed by the engine. `force_fp32=True` on G.synthesis / D runs every block in float32
(the objective uses it for the R1 and path-length passes).

Module and parameter names follow NVIDIA's public StyleGAN2-ADA layout (`mapping.fc0.weight`,
`synthesis.b4.conv1.affine.weight`, `b4.mbstd`, ...) so that official weights convert with a key map.
Nothing here knows about training; the objective lives in `pipeline.objectives.stylegan2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import require
from pipeline.nn import (
    DEFAULT_RESAMPLE_FILTER,
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    normalize_2nd_moment,
)
from pipeline.ops import ACTIVATIONS, downsample2d, modulated_conv2d, setup_filter, upsample2d

NoiseMode = Literal["random", "const", "none"]


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class MappingConfig:
    num_layers: int = 8  # NVIDIA's `map`
    lr_multiplier: float = 0.01
    w_avg_beta: float = 0.995  # decay of the tracked average w used for truncation

    def validate(self, prefix: str) -> None:
        require(self.num_layers >= 1, f"{prefix}.num_layers", self.num_layers, "must be >= 1")
        require(self.lr_multiplier > 0, f"{prefix}.lr_multiplier", self.lr_multiplier, "must be > 0")
        require(0 <= self.w_avg_beta < 1, f"{prefix}.w_avg_beta", self.w_avg_beta, "must be in [0, 1)")


@dataclass
class SynthesisConfig:
    architecture: Literal["orig", "skip", "resnet"] = "skip"
    channel_base: int = 32768  # channels at resolution r = min(channel_base // r, channel_max)
    channel_max: int = 512
    conv_clamp: float | None = None  # clamp conv outputs to +-conv_clamp (256 with fp16 layers)
    num_fp16_res: int = 0  # float16 activations in this many highest resolutions (NVIDIA uses 4); 0 = float32

    def validate(self, prefix: str) -> None:
        require(self.channel_base >= 1, f"{prefix}.channel_base", self.channel_base, "must be >= 1")
        require(self.channel_max >= 1, f"{prefix}.channel_max", self.channel_max, "must be >= 1")
        require(self.conv_clamp is None or self.conv_clamp > 0, f"{prefix}.conv_clamp", self.conv_clamp, "must be > 0")
        require(self.num_fp16_res >= 0, f"{prefix}.num_fp16_res", self.num_fp16_res, "must be an integer >= 0")


@dataclass
class DiscriminatorConfig:
    architecture: Literal["orig", "skip", "resnet"] = "resnet"
    channel_base: int = 32768
    channel_max: int = 512
    conv_clamp: float | None = None
    mbstd_group_size: int = 4  # the batch per rank must be divisible by it
    mbstd_num_channels: int = 1
    cmap_dim: int | None = None  # dimension of the conditioning projection; null = channels at 4x4
    num_fp16_res: int = 0  # float16 activations in this many highest resolutions (NVIDIA uses 4); 0 = float32

    def validate(self, prefix: str) -> None:
        require(self.num_fp16_res >= 0, f"{prefix}.num_fp16_res", self.num_fp16_res, "must be an integer >= 0")
        require(self.channel_base >= 1, f"{prefix}.channel_base", self.channel_base, "must be >= 1")
        require(self.channel_max >= 1, f"{prefix}.channel_max", self.channel_max, "must be >= 1")
        require(self.mbstd_group_size >= 1, f"{prefix}.mbstd_group_size", self.mbstd_group_size, "must be >= 1")
        require(self.mbstd_num_channels >= 0, f"{prefix}.mbstd_num_channels", self.mbstd_num_channels, "must be >= 0")
        require(self.conv_clamp is None or self.conv_clamp > 0, f"{prefix}.conv_clamp", self.conv_clamp, "must be > 0")


@dataclass
class StyleModelConfig:
    """What every style-based model section has (StyleGAN2's and StyleGAN3's): the latent sizes, the classes and
    the image channels. Subclasses add their `mapping`, `synthesis` and `discriminator` sections, each of which
    validates itself."""

    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0  # number of classes for class-conditional training; 0 = unconditional
    img_channels: int = 3

    def validate(self, prefix: str) -> None:
        require(self.z_dim >= 1, f"{prefix}.z_dim", self.z_dim, "must be >= 1")
        require(self.w_dim >= 1, f"{prefix}.w_dim", self.w_dim, "must be >= 1")
        require(self.c_dim >= 0, f"{prefix}.c_dim", self.c_dim, "must be >= 0")
        require(self.img_channels in (1, 3, 4), f"{prefix}.img_channels", self.img_channels, "must be 1, 3 or 4")
        for name in ("mapping", "synthesis", "discriminator"):
            getattr(self, name).validate(f"{prefix}.{name}")


@dataclass
class StyleGAN2Config(StyleModelConfig):
    mapping: MappingConfig = field(default_factory=MappingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


def fp16_resolution(img_resolution: int, num_fp16_res: int) -> int:
    """Lowest resolution whose blocks run in float16: the top `num_fp16_res` resolutions, never below 8x8
    (4x4 layers are cheap, and D's minibatch-std and fully connected head need float32's range)."""
    if num_fp16_res <= 0:
        return img_resolution * 2  # none
    return max(2 ** (int(np.log2(img_resolution)) + 1 - num_fp16_res), 8)


def _channels(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


# ----------------------------------------------------------------------------------------------------------------
# Generator


class MappingSpec(Protocol):
    num_layers: int
    lr_multiplier: float
    w_avg_beta: float | None


class GeneratorDims(Protocol):
    """What a generator config tells its mapping network (StyleGAN2Config, StyleGAN3Config)."""

    z_dim: int
    c_dim: int
    w_dim: int

    @property
    def mapping(self) -> MappingSpec: ...


class MappingNetwork(nn.Module):
    """z (and class c) -> w. With `num_ws`, w is broadcast to [N, num_ws, w_dim]; `w_avg` tracks E[w]."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.995,
        activation: str = "lrelu",
    ) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = w_dim if c_dim > 0 else 0
        features = [z_dim + embed_features] + [w_dim] * num_layers
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    @classmethod
    def from_config(cls, cfg: GeneratorDims, num_ws: int) -> MappingNetwork:
        """The mapping network of a generator config (StyleGAN2's or StyleGAN3's), broadcasting to `num_ws`."""
        m = cfg.mapping
        return cls(cfg.z_dim, cfg.c_dim, cfg.w_dim, num_ws=num_ws, num_layers=m.num_layers,
                   lr_multiplier=m.lr_multiplier, w_avg_beta=m.w_avg_beta)  # fmt: skip

    def forward(
        self,
        z: Tensor | None,
        c: Tensor | None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> Tensor:
        parts = []
        if self.z_dim > 0:
            assert z is not None and z.shape[1:] == (self.z_dim,), f"expected z of shape [N, {self.z_dim}]"
            parts.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            assert c is not None and c.shape[1:] == (self.c_dim,), f"expected c of shape [N, {self.c_dim}]"
            parts.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if update_emas and self.num_ws is not None and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            # Truncation trick: pull w towards the average by psi (only the first `truncation_cutoff` layers).
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + scaled per-pixel noise + bias + leaky ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.act_gain = ACTIVATIONS[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self, x: Tensor, w: Tensor, noise_mode: NoiseMode = "random", fused_modconv: bool = True, gain: float = 1.0
    ) -> Tensor:
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = (
                torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
            )
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        return modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=(self.up == 1),
            fused_modconv=fused_modconv,
            bias=self.bias,
            act=self.activation,
            gain=self.act_gain * gain,
            clamp=self.conv_clamp * gain if self.conv_clamp is not None else None,
        )


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to image channels, without demodulation."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1, conv_clamp: float | None = None
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: Tensor, w: Tensor, fused_modconv: bool = True) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(
            x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv, bias=self.bias, clamp=self.conv_clamp
        )


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: (const | conv0 up) -> conv1 -> toRGB, in orig/skip/resnet form."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        architecture: str = "skip",
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.num_conv = 0
        self.num_torgb = 0
        layer_kwargs = dict(w_dim=w_dim, resolution=resolution, resample_filter=resample_filter, conv_clamp=conv_clamp)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(
                in_channels, out_channels, kernel_size=1, bias=False, up=2, resample_filter=resample_filter
            )

    def forward(
        self,
        x: Tensor | None,
        img: Tensor | None,
        ws: Tensor,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool | None = None,
        force_fp32: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        assert ws.shape[1] == self.num_conv + self.num_torgb, "wrong number of ws for this block"
        w_iter = iter(ws.unbind(dim=1))
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        if fused_modconv is None:
            # Grouped convs are faster for inference; per-sample scaling is cheaper to differentiate in training.
            fused_modconv = not self.training
        if x is not None:
            x = x.to(dtype)
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        elif self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv, gain=math.sqrt(0.5))
            x = y + x
        else:
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            # The image path stays float32 whatever the block's dtype: it is the sum of every block's output.
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, img_channels, R, R] in roughly [-1, 1]."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        architecture: str = "skip",
        channel_base: int = 32768,
        channel_max: int = 512,
        conv_clamp: float | None = None,
        num_fp16_res: int = 0,
    ) -> None:
        super().__init__()
        assert img_resolution >= 4 and img_resolution & (img_resolution - 1) == 0
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(2, int(np.log2(img_resolution)) + 1)]
        fp16_from = fp16_resolution(img_resolution, num_fp16_res)
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = _channels(res // 2, channel_base, channel_max) if res > 4 else 0
            block = SynthesisBlock(
                in_channels,
                _channels(res, channel_base, channel_max),
                w_dim=w_dim,
                resolution=res,
                img_channels=img_channels,
                is_last=(res == img_resolution),
                architecture=architecture,
                conv_clamp=conv_clamp,
                use_fp16=res >= fp16_from,
            )
            # A block's toRGB shares its w with the next block's first conv, so only the last toRGB adds a w.
            self.num_ws += block.num_conv + (block.num_torgb if block.is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(
        self,
        ws: Tensor,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool | None = None,
        force_fp32: bool = False,
        update_emas: bool = False,  # nothing to track here; taken so that one loss drives StyleGAN2 and StyleGAN3
    ) -> Tensor:
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), (
            f"expected ws [N, {self.num_ws}, {self.w_dim}]"
        )
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block: SynthesisBlock = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode, fused_modconv=fused_modconv, force_fp32=force_fp32)
        assert img is not None
        return img


class StyleGenerator(nn.Module):
    """G(z, c) = synthesis(mapping(z, c)), the generator of every style-based family. Images are float in roughly
    [-1, 1]. A family's generator builds its synthesis network (which knows its `num_ws`) and passes it here; the
    mapping network follows from the config (built after the synthesis network, as NVIDIA's code does, so that
    seeded initialisations match)."""

    def __init__(self, cfg: StyleModelConfig, img_resolution: int, synthesis: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution = img_resolution
        self.img_channels = cfg.img_channels
        self.synthesis = synthesis
        self.num_ws: int = synthesis.num_ws
        self.mapping = MappingNetwork.from_config(cfg, self.num_ws)  # type: ignore[arg-type]  # subclasses' cfg

    def forward(
        self,
        z: Tensor,
        c: Tensor | None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool | None = None,
        force_fp32: bool = False,
    ) -> Tensor:
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, update_emas=update_emas)
        return self.synthesis(
            ws, noise_mode=noise_mode, fused_modconv=fused_modconv, force_fp32=force_fp32, update_emas=update_emas
        )


class Generator(StyleGenerator):
    """StyleGAN2's generator: the synthesis network of `cfg.synthesis` behind the mapping network."""

    def __init__(self, cfg: StyleGAN2Config, img_resolution: int) -> None:
        s = cfg.synthesis
        synthesis = SynthesisNetwork(
            cfg.w_dim,
            img_resolution,
            cfg.img_channels,
            architecture=s.architecture,
            channel_base=s.channel_base,
            channel_max=s.channel_max,
            conv_clamp=s.conv_clamp,
            num_fp16_res=s.num_fp16_res,
        )
        super().__init__(cfg, img_resolution, synthesis)


# ----------------------------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nn.Module):
    """One resolution of D: (fromRGB) -> conv0 -> conv1 (2x down), in orig/skip/resnet form."""

    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resolution: int,
        img_channels: int,
        architecture: str = "resnet",
        activation: str = "lrelu",
        resample_filter: Sequence[float] = DEFAULT_RESAMPLE_FILTER,
        conv_clamp: float | None = None,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation=activation, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation=activation, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(
            tmp_channels,
            out_channels,
            3,
            activation=activation,
            down=2,
            resample_filter=resample_filter,
            conv_clamp=conv_clamp,
        )
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter)

    def forward(self, x: Tensor | None, img: Tensor | None, force_fp32: bool = False) -> tuple[Tensor, Tensor | None]:
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        if x is not None:
            x = x.to(dtype)
        if self.in_channels == 0 or self.architecture == "skip":
            assert img is not None
            y = self.fromrgb(img.to(dtype))  # the image itself stays float32 for the skip path's downsampling
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        assert x is not None
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=math.sqrt(0.5))
            x = y + x
        else:
            x = self.conv1(self.conv0(x))
        return x, img


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: (fromRGB) -> minibatch-std -> conv -> fc -> out, projected onto cmap when conditional."""

    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        resolution: int,
        img_channels: int,
        architecture: str = "resnet",
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
        activation: str = "lrelu",
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.architecture = architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, 1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(
            in_channels + mbstd_num_channels, in_channels, 3, activation=activation, conv_clamp=conv_clamp
        )
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: Tensor, img: Tensor | None, cmap: Tensor | None) -> Tensor:
        x = x.to(torch.float32)  # the 4x4 head always runs in float32 (see `fp16_resolution`)
        if self.architecture == "skip":
            assert img is not None
            x = x + self.fromrgb(img)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            assert cmap is not None
            # Projection discriminator (Miyato & Koyama 2018): score = <features, embed(c)> / sqrt(dim).
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """D(img, c) -> one logit per image, [N, 1]."""

    def __init__(self, cfg: StyleGAN2Config, img_resolution: int) -> None:
        super().__init__()
        d = cfg.discriminator
        self.c_dim = cfg.c_dim
        self.img_resolution = img_resolution
        self.img_channels = cfg.img_channels
        self.block_resolutions = [2**i for i in range(int(np.log2(img_resolution)), 2, -1)]
        channels = {r: _channels(r, d.channel_base, d.channel_max) for r in [*self.block_resolutions, 4]}
        cmap_dim = (d.cmap_dim if d.cmap_dim is not None else channels[4]) if cfg.c_dim > 0 else 0
        fp16_from = fp16_resolution(img_resolution, d.num_fp16_res)
        for res in self.block_resolutions:
            block = DiscriminatorBlock(
                channels[res] if res < img_resolution else 0,
                channels[res],
                channels[res // 2],
                resolution=res,
                img_channels=cfg.img_channels,
                architecture=d.architecture,
                conv_clamp=d.conv_clamp,
                use_fp16=res >= fp16_from,
            )
            setattr(self, f"b{res}", block)
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(
                z_dim=0,
                c_dim=cfg.c_dim,
                w_dim=cmap_dim,
                num_ws=None,
                w_avg_beta=None,
                lr_multiplier=cfg.mapping.lr_multiplier,
            )
        self.b4 = DiscriminatorEpilogue(
            channels[4],
            cmap_dim=cmap_dim,
            resolution=4,
            img_channels=cfg.img_channels,
            architecture=d.architecture,
            mbstd_group_size=d.mbstd_group_size,
            mbstd_num_channels=d.mbstd_num_channels,
            conv_clamp=d.conv_clamp,
        )

    def forward(self, img: Tensor, c: Tensor | None, force_fp32: bool = False) -> Tensor:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        assert img.ndim == 4 and img.shape[1:] == expected, f"expected images [N, {expected}], got {list(img.shape)}"
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, force_fp32=force_fp32)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        assert x is not None
        return self.b4(x, img, cmap)

    def freeze_order(self) -> list[nn.Module]:
        """D's block layers from the input side, in the order NVIDIA's `--freezed=N` counts them (per block:
        fromrgb, conv0, conv1, skip); freezing the first N of them is Freeze-D (Mo et al. 2020)."""
        blocks = [getattr(self, f"b{res}") for res in self.block_resolutions]
        names = ("fromrgb", "conv0", "conv1", "skip")
        return [getattr(b, n) for b in blocks for n in names if getattr(b, n, None) is not None]
