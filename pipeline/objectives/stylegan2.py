"""StyleGAN2's objective: non-saturating logistic loss, lazy R1 on reals, lazy path-length regularization.

Phases per step (Karras et al. 2020, Appendix B): Gmain every step; Greg every `g_reg_interval` steps on a
batch shrunk by `pl_batch_shrink`; Dmain every step; Dreg (R1) every `d_reg_interval` steps. Lazy penalties are
scaled by their interval, and the optimizers' lr and betas are corrected by interval / (interval + 1) (the
engine asks `reg_interval`). Style mixing regularization feeds two latents to G with a random crossover layer.

Augmentation as in StyleGAN2-ADA: D always sees augmented images (Gmain fakes, Dmain fakes and reals, and the
reals of R1, whose gradient is taken with respect to the images before augmentation). D's logits on reals
(Dmain and R1 passes) are reported to the augmentation for ADA's r_t.

Blur (StyleGAN3, Karras et al. 2021, Appendix C): D's inputs, fake and real, can be blurred by a Gaussian whose
sigma fades linearly from `blur_init_sigma` pixels to 0 over the first `blur_fade_kimg` kimg (NVIDIA's StyleGAN3-R
uses 10 px over batch * 200 / 32 kimg), so that D cannot lean on high frequencies before G can make them. The blur
comes before augmentation, and R1's gradient is taken with respect to the unblurred reals.

Mixed precision: R1 and path-length passes run G and D with `force_fp32=True`, i.e. without the float16 layers
of `num_fp16_res`, and the penalties are reduced in float32: they square gradients, which float16 can neither
hold (overflow) nor resolve (underflow). Main passes use the networks' own precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment import Augment
from pipeline.errors import require
from pipeline.objectives.base import Net, Networks, Objective, Phase, PhaseInputs
from pipeline.objectives.regularizers import PathLengthRegularizer, r1_penalty
from pipeline.ops.upfirdn2d import filter2d


@dataclass
class StyleGAN2LossConfig:
    r1_gamma: float = 10.0  # R1 weight; the penalty is r1_gamma / 2 * ||grad||^2
    d_reg_interval: int = 16  # 0 = no lazy regularization (R1 in every D step)
    pl_weight: float = 2.0  # 0 disables path-length regularization
    g_reg_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing_prob: float = 0.9
    blur_init_sigma: float = 0.0  # px; sigma of the Gaussian blur on D's inputs at kimg 0; 0 = no blur
    blur_fade_kimg: float | None = None  # the blur fades to 0 over this many kimg; null = batch_size * 200 / 32

    def validate(self, prefix: str) -> None:
        checks = [
            (self.r1_gamma >= 0, "r1_gamma", self.r1_gamma, "must be >= 0"),
            (self.d_reg_interval >= 0, "d_reg_interval", self.d_reg_interval, "must be >= 0"),
            (self.pl_weight >= 0, "pl_weight", self.pl_weight, "must be >= 0"),
            (self.g_reg_interval >= 0, "g_reg_interval", self.g_reg_interval, "must be >= 0"),
            (self.pl_batch_shrink >= 1, "pl_batch_shrink", self.pl_batch_shrink, "must be >= 1"),
            (0 < self.pl_decay <= 1, "pl_decay", self.pl_decay, "must be in (0, 1]"),
            (0 <= self.style_mixing_prob <= 1, "style_mixing_prob", self.style_mixing_prob, "must be in [0, 1]"),
            (0 <= self.blur_init_sigma < math.inf, "blur_init_sigma", self.blur_init_sigma, "must be finite and >= 0"),
            (
                self.blur_fade_kimg is None or self.blur_fade_kimg > 0,
                "blur_fade_kimg",
                self.blur_fade_kimg,
                "must be > 0, or null for batch_size * 200 / 32",
            ),
        ]
        for ok, key, value, allowed in checks:
            require(ok, f"{prefix}.{key}", value, allowed)


def blur_fade_kimg(cfg: StyleGAN2LossConfig, batch_size: int) -> float:
    """Over how many kimg the blur on D's inputs fades: the configured value, or NVIDIA's batch_size * 200 / 32."""
    return cfg.blur_fade_kimg if cfg.blur_fade_kimg is not None else batch_size * 200 / 32


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """img [N, C, H, W] filtered by a separable Gaussian of `sigma` pixels, truncated at floor(3 sigma) taps each
    side and normalised to sum 1 (edges see zero padding); the identity when floor(3 sigma) is 0."""
    radius = math.floor(sigma * 3)
    if radius <= 0:
        return img
    f = torch.arange(-radius, radius + 1, device=img.device, dtype=torch.float32).div(sigma).square().neg().exp2()
    return filter2d(img, f / f.sum())


class StyleGAN2Objective(Objective):
    """The loss of StyleGAN2 and StyleGAN3 (NVIDIA trains both with one loss). `batch_size` (images per step, over
    all ranks) sets the blur's default fade."""

    def __init__(self, cfg: StyleGAN2LossConfig, batch_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.blur_fade_kimg = blur_fade_kimg(cfg, batch_size)
        self.path_length = PathLengthRegularizer(cfg.pl_decay)

    def blur_sigma(self, cur_nimg: int) -> float:
        """Sigma (px) of the blur on D's inputs after `cur_nimg` images: linear from blur_init_sigma to 0."""
        return max(1 - cur_nimg / (self.blur_fade_kimg * 1e3), 0) * self.cfg.blur_init_sigma

    # ------------------------------------------------------------------------------------------------------------
    # Schedule

    def _lazy(self, weight: float, interval: int) -> int | None:
        return interval if weight > 0 and interval > 0 else None

    def reg_interval(self, net: Net) -> int | None:
        if net == "G":
            return self._lazy(self.cfg.pl_weight, self.cfg.g_reg_interval)
        return self._lazy(self.cfg.r1_gamma, self.cfg.d_reg_interval)

    def phases(self) -> list[Phase]:
        phases = [Phase("Gmain", "G")]
        g_interval = self.reg_interval("G")
        if g_interval is not None:
            phases.append(Phase("Greg", "G", g_interval, double_backward=True))
        d_interval = self.reg_interval("D")
        if d_interval is not None or self.cfg.r1_gamma == 0:
            phases.append(Phase("Dmain", "D"))
            if d_interval is not None:
                phases.append(Phase("Dreg", "D", d_interval, double_backward=True))
        else:  # R1 every step, in the same backward as the main loss
            phases.append(Phase("Dboth", "D", double_backward=True))
        return phases

    def compile_units(self, nets: Networks) -> list[nn.Module]:
        # run_G calls the mapping twice (style mixing) and mixes between the calls
        return [nets.G.mapping, nets.G.synthesis, nets.D]

    # ------------------------------------------------------------------------------------------------------------
    # Forward passes

    def run_G(
        self, G: nn.Module, z: Tensor, c: Tensor | None, update_emas: bool = False, force_fp32: bool = False
    ) -> tuple[Tensor, Tensor]:
        ws = G.mapping(z, c, update_emas=update_emas)
        if self.cfg.style_mixing_prob > 0:
            # One crossover layer per batch; with probability 1 - p it is num_ws, i.e. no layer is swapped.
            num_ws = ws.shape[1]
            cutoff = torch.randint(1, num_ws, [], device=ws.device)
            mix = torch.rand([], device=ws.device) < self.cfg.style_mixing_prob
            cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, num_ws))
            ws_mix = G.mapping(torch.randn_like(z), c, update_emas=False)
            layer = torch.arange(num_ws, device=ws.device)[None, :, None]
            ws = torch.where(layer < cutoff, ws, ws_mix)
        return G.synthesis(ws, force_fp32=force_fp32, update_emas=update_emas), ws

    def run_D(
        self,
        D: nn.Module,
        img: Tensor,
        c: Tensor | None,
        augment: Augment | None,
        force_fp32: bool = False,
        blur_sigma: float = 0.0,
    ) -> Tensor:
        img = gaussian_blur(img, blur_sigma)
        if augment is not None:
            img = augment(img)
        return D(img, c, force_fp32=force_fp32)

    # ------------------------------------------------------------------------------------------------------------
    # Losses

    def phase_loss(self, phase: Phase, nets: Networks, inputs: PhaseInputs) -> tuple[Tensor, dict[str, Tensor]]:
        G, D = nets.G, nets.D
        stats: dict[str, Tensor] = {}
        gain = float(phase.interval)
        blur = self.blur_sigma(inputs.cur_nimg)

        if phase.name == "Gmain":
            gen_img, _ = self.run_G(G, inputs.gen_z, inputs.gen_c)
            gen_logits = self.run_D(D, gen_img, inputs.gen_c, inputs.augment, blur_sigma=blur)
            loss = F.softplus(-gen_logits).mean()  # -log(sigmoid(D(G(z))))
            stats["Loss/scores/fake_G"] = gen_logits.detach().mean()
            stats["Loss/G/loss"] = loss.detach()
            return loss, stats

        if phase.name == "Greg":
            n = max(inputs.gen_z.shape[0] // self.cfg.pl_batch_shrink, 1)
            gen_c = inputs.gen_c[:n] if inputs.gen_c is not None else None
            gen_img, gen_ws = self.run_G(G, inputs.gen_z[:n], gen_c, force_fp32=True)
            penalty, lengths = self.path_length(gen_img, gen_ws)
            loss = penalty.mean() * self.cfg.pl_weight
            stats["Loss/pl_penalty"] = penalty.detach().mean()
            stats["Loss/pl_length"] = lengths.detach().mean()
            stats["Loss/pl_mean"] = self.path_length.pl_mean.detach().clone()
            # `gen_img[:, 0, 0, 0] * 0` gives every synthesis parameter a (zero) gradient, as NVIDIA's loss does:
            # Adam then steps every parameter, so its per-parameter step counts and second moments stay NVIDIA's.
            return (gen_img[:, 0, 0, 0] * 0).sum() + loss * gain, stats

        if phase.name in ("Dmain", "Dboth", "Dreg"):
            loss = torch.zeros([], device=inputs.real_img.device)
            if phase.name in ("Dmain", "Dboth"):
                with torch.no_grad():
                    gen_img, _ = self.run_G(G, inputs.gen_z, inputs.gen_c, update_emas=True)
                gen_logits = self.run_D(D, gen_img, inputs.gen_c, inputs.augment, blur_sigma=blur)
                loss = loss + F.softplus(gen_logits).mean()  # -log(1 - sigmoid(D(G(z))))
                stats["Loss/scores/fake"] = gen_logits.detach().mean()
            regularize = phase.name != "Dmain"
            real_img = inputs.real_img.detach().requires_grad_(regularize)
            real_logits = self.run_D(D, real_img, inputs.real_c, inputs.augment, force_fp32=regularize, blur_sigma=blur)
            if inputs.augment is not None:
                inputs.augment.observe_real_logits(real_logits)
            if phase.name in ("Dmain", "Dboth"):
                loss = loss + F.softplus(-real_logits).mean()  # -log(sigmoid(D(x)))
                stats["Loss/scores/real"] = real_logits.detach().mean()
                stats["Loss/D/loss"] = loss.detach()
            if phase.name in ("Dreg", "Dboth"):
                penalty = r1_penalty(real_img, real_logits)
                stats["Loss/r1_penalty"] = penalty.detach().mean()
                reg = penalty.mean() * (self.cfg.r1_gamma / 2)
                if phase.name == "Dreg":
                    # Zero-weighted logits give D's output layer a (zero) gradient, as in NVIDIA's loss (see Greg).
                    return (real_logits * 0).sum() + reg * gain, stats
                loss = loss + reg
            return loss, stats

        raise ValueError(f"StyleGAN2 objective has no phase {phase.name!r}")
