"""What every augmentation gives the objective and the engine, and the overfitting statistic they share.

Contract:
- `forward(images) -> images`: a random transformation of a batch [N, C, H, W] (values around [-1, 1]), of the
  same shape and dtype, differentiable with respect to `images` (twice, as R1 needs). Randomness comes from
  torch's global RNG, so a checkpoint's RNG state makes the augmentation of a resumed run identical.
- `observe_real_logits(logits)`: D's outputs on (augmented) reals. Their signs are summed on the device (no host
  sync) into `signs_sum` / `signs_count`.
- `end_step(step_idx, nimg_per_step, reduce)`: called by the engine after every training step. Every `interval`
  steps it reduces the sign sums over ranks (`reduce`, a sum all-reduce, or None on one rank), computes
  r_t = E[sign(D(real))] (Karras et al. 2020, eq. 1: 0 when D cannot tell reals from fakes, 1 when it is certain
  on every real) and calls `update(rt, nimg)`, which may move p.
- `log_values()`: scalars to log (`Augment/rt`, and `Augment/p` where there is a p).

All evolving values are buffers, so `state_dict()` holds everything a checkpoint needs for an exact resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Reduce = Callable[[Tensor], Tensor]


class Augment(nn.Module):
    """Base of the augmentation pipes: sign statistics of D on reals, accumulated between adjustments."""

    def __init__(self, interval: int = 4) -> None:
        super().__init__()
        if interval < 1:
            raise ValueError(f"augmentation adjustment interval must be >= 1, got {interval}")
        self.interval = interval
        # float64 sums: counts of +-1 stay exact far beyond float32's 2**24.
        self.register_buffer("signs_sum", torch.zeros([], dtype=torch.float64))
        self.register_buffer("signs_count", torch.zeros([], dtype=torch.float64))
        self.register_buffer("rt", torch.full([], float("nan")))  # the last r_t; NaN until the first adjustment

    def observe_real_logits(self, logits: Tensor) -> None:
        with torch.no_grad():
            self.signs_sum += logits.detach().sign().sum().to(torch.float64)
            self.signs_count += logits.numel()

    def end_step(self, step_idx: int, nimg_per_step: int, reduce: Reduce | None = None) -> None:
        """After training step `step_idx` (0-based, before the engine increments it); `nimg_per_step` is the
        global batch. Adjusts on steps 0, interval, 2*interval, ... as StyleGAN2-ADA does."""
        if step_idx % self.interval != 0:
            return
        stats = torch.stack([self.signs_sum, self.signs_count])
        if reduce is not None:
            stats = reduce(stats)
        total, count = (float(v) for v in stats.tolist())  # one host sync per `interval` steps
        self.signs_sum.zero_()
        self.signs_count.zero_()
        if count == 0:  # no D step since the last adjustment: nothing to learn from
            return
        rt = total / count
        self.rt.fill_(rt)
        self.update(rt, nimg_per_step * self.interval)

    def update(self, rt: float, nimg: int) -> None:
        """React to r_t measured over the last `nimg` images; the default keeps everything as it is."""

    def log_values(self) -> dict[str, Tensor]:
        return {"Augment/rt": self.rt.detach().clone()}
