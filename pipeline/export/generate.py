"""Images from a generator by seed: z = N(0, I) drawn by `numpy.random.RandomState(seed)`, as NVIDIA's
generate.py does, so a seed names the same latent in both code bases."""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from pipeline.errors import GanpipeError
from pipeline.imaging import save_png, to_uint8


class SeedsError(GanpipeError, ValueError):
    """A --seeds list is malformed."""


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (inclusive ranges)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise SeedsError(f"--seeds {text!r} is invalid at {part!r}: use a list like 0-15 or 1,5,9-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SeedsError(f"--seeds range {part!r} is descending: write it as {hi}-{lo}")
        seeds.extend(range(lo, hi + 1))
    return seeds


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])).float()


@torch.no_grad()
def generate_images(
    G: nn.Module,
    seeds: list[int],
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
    noise_mode: str = "const",
    batch_size: int = 16,
) -> torch.Tensor:
    """Float images in [-1, 1], one per seed, [N, C, H, W] on the CPU."""
    c_dim = G.c_dim
    if c_dim > 0 and class_idx is None:
        raise SeedsError(f"this generator is class-conditional ({c_dim} classes): pass --class C")
    if c_dim == 0 and class_idx is not None:
        raise SeedsError("this generator is unconditional: drop --class")
    if class_idx is not None and not 0 <= class_idx < c_dim:
        raise SeedsError(f"--class {class_idx} is out of range: choose 0..{c_dim - 1}")
    device = next(G.parameters()).device
    z_all = seed_latents(seeds, G.z_dim)
    out = []
    for i in range(0, len(seeds), batch_size):
        z = z_all[i : i + batch_size].to(device)
        c = None
        if class_idx is not None:
            c = torch.zeros([z.shape[0], c_dim], device=device)
            c[:, class_idx] = 1
        out.append(G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode).cpu())
    return torch.cat(out)


def write_images(images: torch.Tensor, seeds: list[int], out_dir: str) -> list[str]:
    urls = []
    for image, seed in zip(to_uint8(images), seeds, strict=True):
        url = f"{out_dir.rstrip('/')}/seed{seed:04d}.png"
        save_png(image, url)
        urls.append(url)
    return urls
