"""The sampler of BigGAN-class generators: the truncation trick on z, per-truncation BN statistics of converted
releases, and standing statistics.

- Truncation (`--trunc T`, T in (0, 1]): z = T * truncnorm(-2, 2), the convention of the public BigGAN-deep
  release (TF-Hub, pytorch-pretrained-BigGAN), whose per-truncation BN statistics were measured with it. A seed
  still names the N(0, I) draw of the base sampler: it is mapped through the normal CDF onto the truncated normal
  (inverse-CDF sampling), so a seed keeps its image's identity as T changes and interpolation stays smooth.
  Without --trunc, z ~ N(0, I), training's distribution. Generators with `n_stats` > 0 (converted releases) also
  normalise with the statistics measured at T.
- Standing statistics (BigGAN-PyTorch's `sample.py`): with `model.standing_stats = N` (or `--standing-stats N`),
  sampling first re-estimates G's BN statistics over N batches of `model.standing_batch` fresh latents, on a copy
  of G (the trained G_ema is never changed), once per sampler.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from pipeline.errors import SamplingError
from pipeline.models.biggan import apply_standing_statistics
from pipeline.models.conditioning import Cond, Conditioning, Request
from pipeline.models.sampling import Program, SampleOptions, Sampler, option
from pipeline.nn import check_truncation, convert_batchnorm

TRUNCATION_BOUND = 2.0  # z = T * truncnorm(-2, 2)


def truncated_latents(z: Tensor, truncation: float) -> Tensor:
    """Standard normal z mapped onto T * truncnorm(-2, 2), elementwise and monotone (inverse-CDF sampling)."""
    check_truncation(truncation, SamplingError)
    zd = z.double()
    lo = torch.special.ndtr(torch.tensor(-TRUNCATION_BOUND, dtype=torch.float64))
    u = lo + (1 - 2 * lo) * torch.special.ndtr(zd)
    return (truncation * torch.special.ndtri(u)).to(z.dtype)


@dataclass(frozen=True)
class BigGANOptions(SampleOptions):
    truncation: float | None = option(
        None,
        "--trunc",
        "truncation T in (0, 1]: z = T * truncnorm(-2, 2) (BigGAN's truncation trick); default: z ~ N(0, I)",
        metavar="T",
        type=float,
    )
    standing_stats: int | None = option(
        None,
        "--standing-stats",
        "re-estimate BN statistics over N batches of fresh latents first (default: the model's standing_stats)",
        metavar="N",
        type=int,
    )

    def __post_init__(self) -> None:
        if self.truncation is not None:
            check_truncation(self.truncation, SamplingError)
        if self.standing_stats is not None and self.standing_stats < 0:
            raise SamplingError(f"--standing-stats {self.standing_stats} is invalid: give 0 or more batches")


class BigGANSampler(Sampler):
    Options: ClassVar[type[SampleOptions]] = BigGANOptions
    graph_fixed: ClassVar[dict[str, object]] = {"truncation": None, "standing_stats": None}

    @classmethod
    def graph_unavailable(cls, options: SampleOptions, request: Request) -> str | None:
        opts: BigGANOptions = options  # type: ignore[assignment]
        if opts.truncation is not None:
            return "--trunc is not available: the exported graph draws from untruncated z; use --runtime torch"
        if opts.standing_stats is not None:
            return "--standing-stats is not available: the exported graph fixes its BN statistics"
        return None

    def __init__(self, G: nn.Module, conditioning: Conditioning, family: str = "") -> None:
        super().__init__(G, conditioning, family)
        self._prepared: dict[int, nn.Module] = {}

    def generator(self, standing_stats: int | None = None) -> nn.Module:
        """G itself, or (standing statistics over N > 0 batches) a copy of G with re-estimated BN statistics."""
        n = self.G.cfg.standing_stats if standing_stats is None else standing_stats
        if n == 0:
            return self.G
        if n not in self._prepared:
            # A plain-BatchNorm copy: under train.sync_batchnorm G_ema's norms are cross-replica, and their
            # all-reduces would wait forever for ranks that are not sampling.
            G = convert_batchnorm(copy.deepcopy(self.G), to_cross_replica=False)
            apply_standing_statistics(G, n, self.G.cfg.standing_batch)
            self._prepared[n] = G
        return self._prepared[n]

    @torch.no_grad()
    def synthesize(self, z: Tensor, c: Cond) -> Tensor:
        return self.generator()(z, c)

    def program(self, request: Request, options: SampleOptions | None = None) -> Program:
        opts: BigGANOptions = self.resolve(options)
        device = self.device
        self.conditioning.from_request(1, request, device)
        G = self.generator(opts.standing_stats)
        t = opts.truncation

        @torch.no_grad()
        def run(z: Tensor, first: int) -> Tensor:
            z = z.to(device)
            c = self.conditioning.from_request(z.shape[0], request, device)
            return G(z, c) if t is None else G(truncated_latents(z, t), c, truncation=t)

        return run


__all__ = ["BigGANOptions", "BigGANSampler", "truncated_latents"]
