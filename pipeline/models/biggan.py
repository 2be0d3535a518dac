"""BigGAN and BigGAN-deep networks (Brock, Donahue & Simonyan, "Large Scale GAN Training for High Fidelity Natural
Image Synthesis", ICLR 2019), with BigGAN-PyTorch's module, parameter and buffer names.

BigGAN (`architecture: biggan`)
    G: a shared class embedding (`shared`, not spectrally normalised); z split into one chunk per block plus one
       ("hierarchical z", `hier`): the first chunk feeds `linear` to a 4x4 map, block i gets [shared(c), chunk i+1]
       as the conditioning vector of its conditional BatchNorms (gain and bias linear in it). Residual up-blocks
       BN-ReLU-up-conv-BN-ReLU-conv (nearest-neighbour upsampling; a 1x1 `conv_sc` on the skip), self-attention
       after the blocks whose output resolution is in `g_attention`, then BN-ReLU-conv(3x3)-tanh.
    D: residual down-blocks (conv-ReLU-conv, 2x2 average pooling; the first without pre-activation), attention at
       `d_attention`, ReLU, global sum pooling, a linear output plus the projection term <embed(c), h>.
BigGAN-deep (`architecture: deep`)
    `depth` bottleneck blocks per resolution (1x1 -> 3x3 -> 3x3 -> 1x1 at a quarter of the channels; the skip
    drops channels instead of convolving them; only the last block of a resolution upsamples and changes width; in
    G each block is its own entry of `blocks`, in D each resolution is), z not split: [shared(c), z] feeds `linear`
    and every BN. D mirrors it (the first block of a resolution downsamples and
    adds channels through a 1x1 `conv_sc` concatenated to the skip), after a 3x3 `input_conv`.

Channel widths are BigGAN-PyTorch's tables (`G_arch`/`D_arch`) times `ch`, for resolutions 32..512. Every conv,
linear and embedding except `shared` is spectrally normalised (`pipeline.nn.spectral_norm`). Weights start
orthogonal (`init: ortho`) or N(0, 0.02) (`N02`), biases at PyTorch's defaults, attention gains at 0.

Converted BigGAN-deep releases carry per-truncation BN statistics (`n_stats`): `G(z, c, truncation=t)` in eval
mode normalises with the statistics measured at t. Nothing here knows about training.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import require
from pipeline.nn import (
    ConditionalBatchNorm2d,
    SelfAttention2d,
    SNConv2d,
    SNEmbedding,
    SNLinear,
    SpectralNorm,
    standing_statistics,
)

# Channel multipliers of `ch`: BigGAN-PyTorch's G_arch (32-512 px) and D_arch (32-256 px; D at 512 px continues
# its pattern), which BigGANdeep.py shares (its 512 px G is the public BigGAN-deep-512 release's layer list).
# G: block i maps G_WIDTHS[i] -> G_WIDTHS[i + 1] and outputs resolution 8 * 2**i.
# D (biggan): block i outputs D_WIDTHS[i] from the image (i = 0) or from D_WIDTHS[i - 1].
G_WIDTHS: dict[int, tuple[int, ...]] = {
    32: (4, 4, 4, 4),
    64: (16, 16, 8, 4, 2),
    128: (16, 16, 8, 4, 2, 1),
    256: (16, 16, 8, 8, 4, 2, 1),
    512: (16, 16, 8, 8, 4, 2, 1, 1),
}
D_WIDTHS: dict[int, tuple[int, ...]] = {
    32: (4, 4, 4, 4),
    64: (1, 2, 4, 8, 16),
    128: (1, 2, 4, 8, 16, 16),
    256: (1, 2, 4, 8, 8, 16, 16),
    512: (1, 1, 2, 4, 8, 8, 16, 16),
}
D_DOWNSAMPLES_32 = (True, True, False, False)  # 32 px: two halvings; larger: every block but the last halves


def d_downsamples(resolution: int) -> tuple[bool, ...]:
    """Whether each BigGAN D block halves the resolution (BigGAN-deep: all but the last entry)."""
    if resolution == 32:
        return D_DOWNSAMPLES_32
    return (True,) * (len(D_WIDTHS[resolution]) - 1) + (False,)


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BigGANConfig:
    architecture: Literal["biggan", "deep"] = "biggan"
    ch: int = 64  # G width multiplier (BigGAN-PyTorch's G_ch)
    d_ch: int | None = None  # D width multiplier (D_ch); null = ch
    z_dim: int = 120
    shared_dim: int = 128  # class embedding width (G_shared)
    c_dim: int = 1000  # classes (n_classes); 0 = unconditional
    hier: bool = True  # biggan: one z chunk per block ("skip-z"); deep always feeds the whole z to every block
    depth: int = 2  # deep: blocks per resolution in G and D (G_depth, D_depth)
    g_attention: list[int] = field(default_factory=lambda: [64])  # output resolutions followed by self-attention
    d_attention: list[int] = field(default_factory=lambda: [64])
    bn_eps: float = 1e-5
    sn_eps: float = 1e-6
    sn_itrs: int = 1  # power iterations per training-mode forward pass
    init: Literal["ortho", "N02"] = "ortho"
    img_channels: int = 3
    n_stats: int = 0  # per-truncation BN statistics of converted BigGAN-deep releases (51); 0 = none
    standing_stats: int = 0  # sampling/eval: re-estimate G's BN statistics over this many batches first; 0 = off
    standing_batch: int = 64  # images per standing-statistics batch

    def validate(self, prefix: str) -> None:
        require(self.ch >= 1, f"{prefix}.ch", self.ch, "must be >= 1")
        require(self.d_ch is None or self.d_ch >= 1, f"{prefix}.d_ch", self.d_ch, "must be >= 1 or null")
        require(self.z_dim >= 1, f"{prefix}.z_dim", self.z_dim, "must be >= 1")
        require(self.shared_dim >= 1, f"{prefix}.shared_dim", self.shared_dim, "must be >= 1")
        require(self.c_dim >= 0, f"{prefix}.c_dim", self.c_dim, "must be >= 0")
        require(self.depth >= 1, f"{prefix}.depth", self.depth, "must be >= 1")
        require(self.bn_eps > 0, f"{prefix}.bn_eps", self.bn_eps, "must be > 0")
        require(self.sn_eps > 0, f"{prefix}.sn_eps", self.sn_eps, "must be > 0")
        require(self.sn_itrs >= 1, f"{prefix}.sn_itrs", self.sn_itrs, "must be >= 1")
        require(self.img_channels in (1, 3, 4), f"{prefix}.img_channels", self.img_channels, "must be 1, 3 or 4")
        require(self.n_stats == 0 or self.n_stats >= 2, f"{prefix}.n_stats", self.n_stats, "must be 0 or >= 2")
        require(self.standing_stats >= 0, f"{prefix}.standing_stats", self.standing_stats, "must be >= 0")
        require(self.standing_batch >= 1, f"{prefix}.standing_batch", self.standing_batch, "must be >= 1")
        require(
            self.c_dim > 0 or self.hier or self.architecture == "deep",
            f"{prefix}.hier",
            self.hier,
            "an unconditional BigGAN needs hier=true (its batch norms are conditioned on z chunks)",
        )

    def check_resolution(self, resolution: int, prefix: str = "model") -> None:
        """Rules that need the image resolution (checked when networks are built)."""
        require(
            resolution in G_WIDTHS,
            "data.resolution",
            resolution,
            f"BigGAN networks exist for {', '.join(map(str, G_WIDTHS))} px",
        )
        g_res = [8 * 2**i for i in range(len(G_WIDTHS[resolution]) - 1)]
        for key, allowed in (("g_attention", g_res), ("d_attention", d_resolutions(resolution, self.architecture))):
            bad = [r for r in getattr(self, key) if r not in allowed]
            require(not bad, f"{prefix}.{key}", getattr(self, key), f"choose among {allowed} at {resolution} px")
        g_widths = dict(zip(g_res, (m * self.ch for m in G_WIDTHS[resolution][1:]), strict=False))
        d_res = d_resolutions(resolution, self.architecture)
        d_widths = dict(zip(d_res, d_block_widths(self, resolution), strict=True))
        for key, widths in (("g_attention", g_widths), ("d_attention", d_widths)):
            narrow = [r for r in getattr(self, key) if widths[r] < 8]
            require(
                not narrow,
                f"{prefix}.{key}",
                getattr(self, key),
                f"self-attention needs >= 8 channels, but {narrow} px have fewer: raise the width or drop them",
            )
        if self.architecture == "biggan" and self.hier:
            slots = len(G_WIDTHS[resolution])
            require(
                self.z_dim % slots == 0,
                f"{prefix}.z_dim",
                self.z_dim,
                f"hier=true at {resolution} px splits z into {slots} equal chunks: use a multiple of {slots} "
                f"(e.g. {self.z_dim // slots * slots})",
            )


def d_resolutions(resolution: int, architecture: str) -> list[int]:
    """Output resolution of each D block."""
    downs = d_downsamples(resolution)
    if architecture == "deep":
        downs = downs[:-1]
    out, r = [], resolution
    for down in downs:
        r = r // 2 if down else r
        out.append(r)
    return out


def d_block_widths(cfg: BigGANConfig, resolution: int) -> list[int]:
    """Output channels of each D block."""
    widths = [m * (cfg.d_ch or cfg.ch) for m in D_WIDTHS[resolution]]
    return widths[1:] if cfg.architecture == "deep" else widths


def _sn_factories(cfg: BigGANConfig) -> tuple[functools.partial, functools.partial]:
    conv = functools.partial(SNConv2d, num_itrs=cfg.sn_itrs, eps=cfg.sn_eps)
    linear = functools.partial(SNLinear, num_itrs=cfg.sn_itrs, eps=cfg.sn_eps)
    return conv, linear


def _init_weights(module: nn.Module, init: str) -> None:
    """BigGAN-PyTorch's init_weights: every conv, linear and embedding weight orthogonal (or N(0, 0.02))."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding):
            if init == "ortho":
                nn.init.orthogonal_(m.weight)
            else:
                nn.init.normal_(m.weight, 0, 0.02)


# ----------------------------------------------------------------------------------------------------------------
# Generator


class GBlock(nn.Module):
    """BigGAN's residual up-block: x + conv2(relu(bn2(conv1(up(relu(bn1(x))))))), the skip up and 1x1-convolved."""

    def __init__(self, cin: int, cout: int, conv: functools.partial, bn: functools.partial, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.bn1, self.conv1 = bn(cin), conv(cin, cout)
        self.bn2, self.conv2 = bn(cout), conv(cout, cout)
        self.conv_sc = conv(cin, cout, kernel_size=1, padding=0) if cin != cout or upsample else None

    def forward(self, x: Tensor, y: Tensor | None, truncation: float | None = None) -> Tensor:
        h = F.relu(self.bn1(x, y, truncation))
        if self.upsample:
            h, x = F.interpolate(h, scale_factor=2), F.interpolate(x, scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y, truncation)))
        if self.conv_sc is not None:
            x = self.conv_sc(x)
        return h + x


class DeepGBlock(nn.Module):
    """BigGAN-deep's bottleneck up-block; the skip keeps the first `cout` channels (then upsamples)."""

    def __init__(self, cin: int, cout: int, conv: functools.partial, bn: functools.partial, upsample: bool) -> None:
        super().__init__()
        hidden = cin // 4
        self.cout, self.upsample = cout, upsample
        self.bn1, self.conv1 = bn(cin), conv(cin, hidden, kernel_size=1, padding=0)
        self.bn2, self.conv2 = bn(hidden), conv(hidden, hidden)
        self.bn3, self.conv3 = bn(hidden), conv(hidden, hidden)
        self.bn4, self.conv4 = bn(hidden), conv(hidden, cout, kernel_size=1, padding=0)

    def forward(self, x: Tensor, y: Tensor | None, truncation: float | None = None) -> Tensor:
        h = self.conv1(F.relu(self.bn1(x, y, truncation)))
        h = F.relu(self.bn2(h, y, truncation))
        x = x[:, : self.cout]
        if self.upsample:
            h, x = F.interpolate(h, scale_factor=2), F.interpolate(x, scale_factor=2)
        h = self.conv3(F.relu(self.bn3(self.conv2(h), y, truncation)))
        h = self.conv4(F.relu(self.bn4(h, y, truncation)))
        return h + x


class Generator(nn.Module):
    """G(z, c) -> images in [-1, 1]; c = class indices [N] (None when unconditional)."""

    def __init__(self, cfg: BigGANConfig, img_resolution: int) -> None:
        super().__init__()
        cfg.check_resolution(img_resolution)
        self.cfg = cfg
        self.z_dim, self.c_dim = cfg.z_dim, cfg.c_dim
        self.img_resolution, self.img_channels = img_resolution, cfg.img_channels
        deep = cfg.architecture == "deep"
        widths = [m * cfg.ch for m in G_WIDTHS[img_resolution]]
        num_blocks = len(widths) - 1
        self.hier = cfg.hier and not deep
        self.z_chunk = cfg.z_dim // (num_blocks + 1) if self.hier else cfg.z_dim
        y_dim = cfg.shared_dim if cfg.c_dim else 0
        cond_dim = y_dim + self.z_chunk if (self.hier or deep) else y_dim
        conv, linear = _sn_factories(cfg)
        bn_linear = functools.partial(linear, bias=False)
        bn = functools.partial(
            ConditionalBatchNorm2d,
            cond_dim=cond_dim or None,
            linear=bn_linear,
            eps=cfg.bn_eps,
            n_stats=cfg.n_stats,
        )
        self.shared = nn.Embedding(cfg.c_dim, cfg.shared_dim) if cfg.c_dim else None
        self.linear = linear(y_dim + cfg.z_dim if deep else self.z_chunk, widths[0] * 16)
        # blocks[k] = [block, attention?]. BigGAN: one block per resolution. BigGAN-deep: `depth` consecutive
        # entries per resolution (BigGAN-PyTorch's layout), attention after the last.
        self.blocks = nn.ModuleList()
        for i in range(num_blocks):
            if deep:
                stages: list[list[nn.Module]] = [
                    [DeepGBlock(widths[i], widths[i + 1] if last else widths[i], conv, bn, upsample=last)]
                    for last in (j == cfg.depth - 1 for j in range(cfg.depth))
                ]
            else:
                stages = [[GBlock(widths[i], widths[i + 1], conv, bn, upsample=True)]]
            if 8 * 2**i in cfg.g_attention:
                stages[-1].append(SelfAttention2d(widths[i + 1], conv))
            self.blocks.extend(nn.ModuleList(stage) for stage in stages)
        out_bn = ConditionalBatchNorm2d(widths[-1], None, eps=cfg.bn_eps, n_stats=cfg.n_stats)
        self.output_layer = nn.ModuleList([out_bn, nn.ReLU(), conv(widths[-1], cfg.img_channels)])
        self.width0 = widths[0]
        _init_weights(self, cfg.init)
        refresh_spectral_norms(self)  # eval mode divides by sv0: make it the initial weights' sigma, not 1

    def forward(self, z: Tensor, c: Tensor | None = None, truncation: float | None = None) -> Tensor:
        """`truncation` selects per-truncation BN statistics in eval mode (converted releases, `n_stats > 0`);
        it does not truncate z: samplers draw z."""
        y = self.shared(c) if self.shared is not None else z.new_zeros([z.shape[0], 0])
        if self.hier:
            zs = torch.split(z, self.z_chunk, dim=1)
            h = self.linear(zs[0])
            ys: list[Tensor | None] = [torch.cat([y, zi], dim=1) for zi in zs[1:]]
        elif self.cfg.architecture == "deep":
            cond = torch.cat([y, z], dim=1)
            h = self.linear(cond)
            ys = [cond] * len(self.blocks)
        else:
            h = self.linear(z)
            ys = [y if self.shared is not None else None] * len(self.blocks)
        h = h.view(z.shape[0], self.width0, 4, 4)
        for stage, yi in zip(self.blocks, ys, strict=True):
            for block in stage:
                h = block(h) if isinstance(block, SelfAttention2d) else block(h, yi, truncation)
        bn, _, conv = self.output_layer
        return torch.tanh(conv(F.relu(bn(h, None, truncation))))


# ----------------------------------------------------------------------------------------------------------------
# Discriminator


class DBlock(nn.Module):
    """BigGAN's residual down-block (`wide`: the hidden width is the output width)."""

    def __init__(self, cin: int, cout: int, conv: functools.partial, preactivation: bool, downsample: bool) -> None:
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1, self.conv2 = conv(cin, cout), conv(cout, cout)
        self.conv_sc = conv(cin, cout, kernel_size=1, padding=0) if cin != cout or downsample else None

    def shortcut(self, x: Tensor) -> Tensor:
        # With pre-activation the 1x1 conv runs before pooling, without it after: BigGAN-PyTorch's orders (the two
        # give different functions of the same weights, so converted weights need exactly these).
        if self.preactivation:
            if self.conv_sc is not None:
                x = self.conv_sc(x)
            return F.avg_pool2d(x, 2) if self.downsample else x
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        return self.conv_sc(x) if self.conv_sc is not None else x

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self.shortcut(x)


class DeepDBlock(nn.Module):
    """BigGAN-deep's bottleneck down-block; the skip gains channels by concatenating a 1x1 conv of itself."""

    def __init__(self, cin: int, cout: int, conv: functools.partial, downsample: bool) -> None:
        super().__init__()
        hidden = cout // 4
        self.downsample = downsample
        self.conv1 = conv(cin, hidden, kernel_size=1, padding=0)
        self.conv2, self.conv3 = conv(hidden, hidden), conv(hidden, hidden)
        self.conv4 = conv(hidden, cout, kernel_size=1, padding=0)
        self.conv_sc = conv(cin, cout - cin, kernel_size=1, padding=0) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv3(F.relu(self.conv2(F.relu(h))))
        h = F.relu(h)
        if self.downsample:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv4(h)
        if self.conv_sc is not None:
            x = torch.cat([x, self.conv_sc(x)], dim=1)
        return h + x


class Discriminator(nn.Module):
    """D(img, c) -> logits [N, 1]; c = class indices [N] (None when unconditional)."""

    def __init__(self, cfg: BigGANConfig, img_resolution: int) -> None:
        super().__init__()
        cfg.check_resolution(img_resolution)
        self.cfg = cfg
        self.img_resolution, self.img_channels = img_resolution, cfg.img_channels
        ch = cfg.d_ch or cfg.ch
        widths = [m * ch for m in D_WIDTHS[img_resolution]]
        downs = d_downsamples(img_resolution)
        resolutions = d_resolutions(img_resolution, cfg.architecture)
        conv, linear = _sn_factories(cfg)
        self.input_conv: nn.Module | None = None
        self.blocks = nn.ModuleList()
        if cfg.architecture == "deep":
            self.input_conv = conv(cfg.img_channels, widths[0])
            for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
                stage: list[nn.Module] = [
                    DeepDBlock(cin if j == 0 else cout, cout, conv, downsample=downs[i] and j == 0)
                    for j in range(cfg.depth)
                ]
                if resolutions[i] in cfg.d_attention:
                    stage.append(SelfAttention2d(cout, conv))
                self.blocks.append(nn.ModuleList(stage))
        else:
            cins = [cfg.img_channels, *widths[:-1]]
            for i, (cin, cout) in enumerate(zip(cins, widths, strict=True)):
                stage = [DBlock(cin, cout, conv, preactivation=i > 0, downsample=downs[i])]
                if resolutions[i] in cfg.d_attention:
                    stage.append(SelfAttention2d(cout, conv))
                self.blocks.append(nn.ModuleList(stage))
        self.linear = linear(widths[-1], 1)
        self.embed = SNEmbedding(cfg.c_dim, widths[-1], num_itrs=cfg.sn_itrs, eps=cfg.sn_eps) if cfg.c_dim else None
        _init_weights(self, cfg.init)
        refresh_spectral_norms(self)

    def forward(self, img: Tensor, c: Tensor | None = None) -> Tensor:
        if (c is None) != (self.embed is None):
            raise ValueError(f"this D takes {'class indices' if self.embed is not None else 'no classes'} as c")
        h = self.input_conv(img) if self.input_conv is not None else img
        for stage in self.blocks:
            for block in stage:
                h = block(h)
        h = F.relu(h).sum(dim=[2, 3])
        out = self.linear(h)
        if self.embed is not None:  # projection discriminator (Miyato & Koyama 2018)
            out = out + (self.embed(c) * h).sum(dim=1, keepdim=True)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling helpers


def refresh_spectral_norms(net: nn.Module) -> None:
    """Every spectral norm's eval-mode sigma (`sv0`) re-estimated for the current weights, with the one power step
    from u0 that BigGAN-PyTorch's eval-mode layers take (u0 does not move)."""
    for module in net.modules():
        if isinstance(module, SpectralNorm):
            module.ema_refresh()


def apply_standing_statistics(G: Generator, num_batches: int, batch_size: int, seed: int = 0) -> None:
    """BigGAN-PyTorch's standing statistics on G: its BN statistics become the average over `num_batches` passes
    of `batch_size` fresh z ~ N(0, I) and uniform classes (seeded, so sampling stays a function of the weights).
    Everything but the BatchNorms keeps its mode: spectral norms in eval mode neither iterate nor change."""
    device = next(G.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    def forward() -> None:
        z = torch.randn([batch_size, G.z_dim], generator=gen).to(device)
        c = torch.randint(G.c_dim, [batch_size], generator=gen).to(device) if G.c_dim else None
        G(z, c)

    standing_statistics(G, forward, num_batches)


__all__ = [
    "D_WIDTHS",
    "G_WIDTHS",
    "BigGANConfig",
    "DBlock",
    "DeepDBlock",
    "DeepGBlock",
    "Discriminator",
    "GBlock",
    "Generator",
    "apply_standing_statistics",
    "d_block_widths",
    "d_downsamples",
    "d_resolutions",
    "refresh_spectral_norms",
]
