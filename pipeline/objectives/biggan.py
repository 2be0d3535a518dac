"""BigGAN's objective: hinge loss (or the non-saturating logistic loss), `d_steps` D updates per G update, each on
its own real batch, and BigGAN's orthogonal regularization.

Schedule: D trains every step (one real batch each); G trains on every `d_steps`-th step, after that step's D
update (Phase offsets: see `pipeline.objectives.base`), on fresh latents. So k D steps per G step consume k real
batches, as in BigGAN-PyTorch's `train_fns` and StudioGAN, and the data position stays exact across resumes.

Losses (Lim & Ye 2017; Miyato et al. 2018):
    hinge  D: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]        G: -E[D(G(z))]
    ns     D: E[softplus(-D(x))] + E[softplus(D(G(z)))]        G: E[softplus(-D(G(z)))]
Orthogonal regularization (Brock et al. 2019, Sec. 3.1), per weight W viewed as [out, -1]:
    R(W) = beta / 2 * || W W^T * (1 - I) ||_F^2      whose gradient 2 * beta * (W W^T * (1 - I)) W
is exactly what BigGAN-PyTorch's `utils.ortho` adds to the gradients; applied to every G weight of two or more
dimensions except the shared class embedding (`g_ortho`, 1e-4 when on), and to D's if `d_ortho` > 0.
Augmentation (DiffAugment, ADA) applies to every image D sees, as in the other families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import require
from pipeline.objectives.base import Networks, Objective, Phase, PhaseInputs


@dataclass
class BigGANLossConfig:
    kind: Literal["hinge", "ns"] = "hinge"
    d_steps: int = 2  # D updates per G update, each on its own real batch (BigGAN: 2; StudioGAN CIFAR10: 5)
    g_ortho: float = 0.0  # orthogonal regularization of G's weights (BigGAN: 1e-4); 0 = off
    d_ortho: float = 0.0

    def validate(self, prefix: str) -> None:
        require(self.d_steps >= 1, f"{prefix}.d_steps", self.d_steps, "must be >= 1")
        require(self.g_ortho >= 0, f"{prefix}.g_ortho", self.g_ortho, "must be >= 0")
        require(self.d_ortho >= 0, f"{prefix}.d_ortho", self.d_ortho, "must be >= 0")


def orthogonal_regularization(weights: list[Tensor], beta: float) -> Tensor:
    """sum over W of beta / 2 * ||W W^T * (1 - I)||_F^2 (see the module docstring), in float32 whatever the autocast.

    For a tall W ([out, in], out > in: BigGAN's first linear layer is 24576 x 20) the [out, out] Gram matrix would
    be gigabytes; the same value is ||W^T W||_F^2 - sum_i ||w_i||^4 with the small [in, in] Gram instead."""
    total = torch.zeros([], device=weights[0].device if weights else None)
    with torch.autocast(total.device.type, enabled=False):  # a device that trains has autocast
        for weight in weights:
            w = weight.float().reshape(weight.shape[0], -1)
            if w.shape[0] > w.shape[1]:
                off_diagonal = (w.t() @ w).square().sum() - w.square().sum(dim=1).square().sum()
            else:
                gram = w @ w.t()
                off_diagonal = (gram - torch.diag_embed(torch.diagonal(gram))).square().sum()
            total = total + off_diagonal
    return total * (beta / 2)


def ortho_weights(module: nn.Module, exclude: tuple[str, ...] = ()) -> list[Tensor]:
    """The parameters orthogonal regularization applies to: every one of 2+ dimensions not under `exclude`."""
    return [
        p
        for name, p in module.named_parameters()
        if p.ndim >= 2 and not any(name == e or name.startswith(e + ".") for e in exclude)
    ]


class BigGANObjective(Objective):
    def __init__(self, cfg: BigGANLossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def phases(self) -> list[Phase]:
        k = self.cfg.d_steps
        return [Phase("Dmain", "D"), Phase("Gmain", "G", interval=k, offset=k - 1)]

    def run_D(self, D: nn.Module, img: Tensor, c: Tensor | None, inputs: PhaseInputs) -> Tensor:
        return D(inputs.augment(img) if inputs.augment is not None else img, c)

    def phase_loss(self, phase: Phase, nets: Networks, inputs: PhaseInputs) -> tuple[Tensor, dict[str, Tensor]]:
        hinge = self.cfg.kind == "hinge"
        stats: dict[str, Tensor] = {}
        if phase.name == "Dmain":
            with torch.no_grad():
                fake = nets.G(inputs.gen_z, inputs.gen_c)
            # One D pass over [fakes, reals], as BigGAN-PyTorch's G_D does: one power iteration per D step.
            n = fake.shape[0]
            c = None if inputs.gen_c is None else torch.cat([inputs.gen_c, inputs.real_c])
            logits = self.run_D(nets.D, torch.cat([fake, inputs.real_img.detach()]), c, inputs)
            fake_logits, real_logits = logits[:n], logits[n:]
            if inputs.augment is not None:
                inputs.augment.observe_real_logits(real_logits)
            if hinge:
                real_loss, fake_loss = F.relu(1 - real_logits).mean(), F.relu(1 + fake_logits).mean()
            else:
                real_loss, fake_loss = F.softplus(-real_logits).mean(), F.softplus(fake_logits).mean()
            loss = real_loss + fake_loss
            stats.update({
                "Loss/scores/real": real_logits.detach().mean(),
                "Loss/scores/fake": fake_logits.detach().mean(),
                "Loss/D/real": real_loss.detach(),
                "Loss/D/fake": fake_loss.detach(),
                "Loss/D/loss": loss.detach(),
            })  # fmt: skip
            if self.cfg.d_ortho > 0:
                ortho = orthogonal_regularization(ortho_weights(nets.D), self.cfg.d_ortho)
                stats["Loss/D/ortho"] = ortho.detach()
                loss = loss + ortho
            return loss, stats
        if phase.name == "Gmain":
            logits = self.run_D(nets.D, nets.G(inputs.gen_z, inputs.gen_c), inputs.gen_c, inputs)
            loss = -logits.mean() if hinge else F.softplus(-logits).mean()
            stats.update({"Loss/scores/fake_G": logits.detach().mean(), "Loss/G/loss": loss.detach()})
            if self.cfg.g_ortho > 0:
                ortho = orthogonal_regularization(ortho_weights(nets.G, exclude=("shared",)), self.cfg.g_ortho)
                stats["Loss/G/ortho"] = ortho.detach()
                loss = loss + ortho
            return loss, stats
        raise ValueError(f"BigGAN objective has no phase {phase.name!r}")


__all__ = ["BigGANLossConfig", "BigGANObjective", "ortho_weights", "orthogonal_regularization"]
