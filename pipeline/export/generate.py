"""Images from a generator by seed, plus style mixing and latent interpolation (what `ganpipe generate` runs).

Contract:
- Seed `s` names the latent z = `numpy.random.RandomState(s).randn(z_dim)`, as NVIDIA's generate.py does, so a
  seed names the same latent in both code bases.
- Truncation is applied in W: w' = center + psi * (w - center). The center is the generator's tracked `w_avg`; for
  a class-conditional generator given a class it is, by default, that class's average w, estimated by mapping
  `class_avg_samples` seeded latents with the class label (`truncation_center="class"`), so truncated images stay
  in their class instead of drifting toward the average over all classes.
- `noise_mode`: `const` (the noise buffers stored with the weights: same image every run), `random` (fresh noise,
  drawn from `noise_seed`, so a run is still reproducible) or `none` (no noise inputs).
- Style mixing (NVIDIA's style_mixing.py): in a grid of row seeds x column seeds, each cell takes the styles listed
  in `col_styles` (indices of the w vectors, coarse layers first) from its column seed and every other style from
  its row seed. Interpolation moves linearly in W between consecutive seeds' (truncated) w, or along the great
  circle between their z (slerp) before mapping.
All functions return float images in [-1, 1] on the CPU and run under `torch.no_grad()`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import GanpipeError
from pipeline.imaging import save_png, to_uint8

NoiseMode = Literal["const", "random", "none"]
TruncationCenter = Literal["class", "global"]
InterpolationSpace = Literal["w", "z"]


class SeedsError(GanpipeError, ValueError):
    """A --seeds list (or another list of integers given to `ganpipe generate`) is malformed or out of range."""


def parse_int_list(text: str, flag: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (inclusive ranges); errors name `flag`."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise SeedsError(f"{flag} {text!r} is invalid at {part!r}: use a list like 0-15 or 1,5,9-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SeedsError(f"{flag} range {part!r} is descending: write it as {hi}-{lo}")
        values.extend(range(lo, hi + 1))
    return values


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (inclusive ranges)."""
    return parse_int_list(text, "--seeds")


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])).float()


def _device(G: nn.Module) -> torch.device:
    return next(G.parameters()).device


def class_labels(G: nn.Module, class_idx: int | None, n: int) -> Tensor | None:
    """One-hot labels [n, c_dim] for `class_idx` (None for an unconditional G), checked against G."""
    c_dim = G.c_dim
    if c_dim > 0 and class_idx is None:
        raise SeedsError(f"this generator is class-conditional ({c_dim} classes): pass --class C")
    if c_dim == 0 and class_idx is not None:
        raise SeedsError("this generator is unconditional: drop --class")
    if class_idx is None:
        return None
    if not 0 <= class_idx < c_dim:
        raise SeedsError(f"--class {class_idx} is out of range: choose 0..{c_dim - 1}")
    c = torch.zeros([n, c_dim], device=_device(G))
    c[:, class_idx] = 1
    return c


@torch.no_grad()
def class_w_avg(G: nn.Module, class_idx: int, num_samples: int = 10_000, seed: int = 0, batch: int = 1024) -> Tensor:
    """E[w | class] estimated from `num_samples` latents of `numpy.random.RandomState(seed)` ([w_dim])."""
    rng = np.random.RandomState(seed)
    total = torch.zeros([G.w_dim], dtype=torch.float64, device=_device(G))
    for start in range(0, num_samples, batch):
        n = min(batch, num_samples - start)
        z = torch.from_numpy(rng.randn(n, G.z_dim)).float().to(_device(G))
        ws = G.mapping(z, class_labels(G, class_idx, n), truncation_psi=1)
        total += ws[:, 0].double().sum(dim=0)
    return (total / num_samples).float()


def truncation_center(
    G: nn.Module, class_idx: int | None, center: TruncationCenter = "class", class_avg_samples: int = 10_000
) -> Tensor:
    """The w that truncation pulls toward: the class average for a conditional G given a class, else `w_avg`."""
    if center == "class" and class_idx is not None:
        return class_w_avg(G, class_idx, class_avg_samples)
    return G.mapping.w_avg


def truncate(ws: Tensor, center: Tensor, psi: float, cutoff: int | None = None) -> Tensor:
    """ws [N, num_ws, w_dim] -> center + psi * (ws - center) in the first `cutoff` layers (all when None)."""
    if psi == 1:
        return ws
    cutoff = ws.shape[1] if cutoff is None else cutoff
    return torch.cat([center.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], dim=1)


@torch.no_grad()
def synthesize(G: nn.Module, ws: Tensor, noise_mode: NoiseMode = "const", noise_seed: int = 0) -> Tensor:
    """Images [N, C, H, W] for ws [N, num_ws, w_dim]; `random` noise is drawn from `noise_seed`."""
    if noise_mode != "random":
        return G.synthesis(ws, noise_mode=noise_mode).cpu()
    device = ws.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(noise_seed)
        return G.synthesis(ws, noise_mode="random").cpu()


class _Mapper:
    """Seeds -> truncated ws for one generator, class and truncation setting (the class center computed once)."""

    def __init__(
        self,
        G: nn.Module,
        truncation_psi: float,
        class_idx: int | None,
        center: TruncationCenter,
        class_avg_samples: int,
        truncation_cutoff: int | None = None,
    ) -> None:
        class_labels(G, class_idx, 1)  # validate the class before any work
        self.G, self.psi, self.class_idx, self.cutoff = G, truncation_psi, class_idx, truncation_cutoff
        self.center = truncation_center(G, class_idx, center, class_avg_samples) if truncation_psi != 1 else None

    @torch.no_grad()
    def __call__(self, z: Tensor) -> Tensor:
        z = z.to(_device(self.G))
        ws = self.G.mapping(z, class_labels(self.G, self.class_idx, z.shape[0]), truncation_psi=1)
        return ws if self.center is None else truncate(ws, self.center, self.psi, self.cutoff)


@torch.no_grad()
def generate_images(
    G: nn.Module,
    seeds: list[int],
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
    noise_mode: NoiseMode = "const",
    batch_size: int = 16,
    truncation_center: TruncationCenter = "class",
    class_avg_samples: int = 10_000,
    noise_seed: int = 0,
) -> torch.Tensor:
    """Float images in [-1, 1], one per seed, [N, C, H, W] on the CPU."""
    mapper = _Mapper(G, truncation_psi, class_idx, truncation_center, class_avg_samples)
    z_all = seed_latents(seeds, G.z_dim)
    out = []
    for i in range(0, len(seeds), batch_size):
        out.append(synthesize(G, mapper(z_all[i : i + batch_size]), noise_mode, noise_seed + i))
    return torch.cat(out)


@torch.no_grad()
def style_mix_grid(
    G: nn.Module,
    row_seeds: list[int],
    col_seeds: list[int],
    col_styles: list[int],
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
    noise_mode: NoiseMode = "const",
    truncation_center: TruncationCenter = "class",
    class_avg_samples: int = 10_000,
) -> tuple[Tensor, tuple[int, int]]:
    """NVIDIA's style-mixing figure: (images, (rows, cols)) for a grid of len(rows)+1 x len(cols)+1 cells.

    Row 0 holds the column seeds' own images, column 0 the row seeds' (the corner is black); cell (r, c) takes
    the styles `col_styles` from column seed c and the rest from row seed r.
    """
    num_ws = G.num_ws
    bad = [i for i in col_styles if not 0 <= i < num_ws]
    if bad or not col_styles:
        raise SeedsError(
            f"--style-layers {bad or col_styles} is out of range: this generator has styles 0..{num_ws - 1}"
        )
    mapper = _Mapper(G, truncation_psi, class_idx, truncation_center, class_avg_samples)
    seeds = list(dict.fromkeys(row_seeds + col_seeds))
    ws = {s: w for s, w in zip(seeds, mapper(seed_latents(seeds, G.z_dim)), strict=True)}
    cells = [None] + [ws[c] for c in col_seeds]  # None: the blank corner
    for r in row_seeds:
        cells.append(ws[r])
        for c in col_seeds:
            mixed = ws[r].clone()
            mixed[col_styles] = ws[c][col_styles]
            cells.append(mixed)
    real = torch.stack([w for w in cells if w is not None])
    images = torch.cat([synthesize(G, real[i : i + 16], noise_mode) for i in range(0, real.shape[0], 16)])
    blank = torch.full_like(images[:1], -1.0)
    return torch.cat([blank, images]), (len(row_seeds) + 1, len(col_seeds) + 1)


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation between rows of a and b ([N, D]) at fractions t ([N]); linear when nearly parallel."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(dim=1).clamp(-1, 1))
    so = torch.sin(omega)
    t = t[:, None]
    lerp = a + (b - a) * t
    safe = so.clamp_min(1e-6)[:, None]
    sl = torch.sin((1 - t) * omega[:, None]) / safe * a + torch.sin(t * omega[:, None]) / safe * b
    return torch.where((so > 1e-6)[:, None], sl, lerp)


@torch.no_grad()
def interpolation_frames(
    G: nn.Module,
    seeds: list[int],
    frames_per_transition: int,
    space: InterpolationSpace = "w",
    truncation_psi: float = 1.0,
    class_idx: int | None = None,
    noise_mode: NoiseMode = "const",
    batch_size: int = 16,
    truncation_center: TruncationCenter = "class",
    class_avg_samples: int = 10_000,
) -> Iterator[Tensor]:
    """Batches of frames from seed to seed: `frames_per_transition` per consecutive pair, then the last seed's own
    image, (len(seeds) - 1) * frames_per_transition + 1 frames in all. Frame k of a transition is at t = k / F."""
    if len(seeds) < 2:
        raise SeedsError("--interpolate needs at least two seeds, e.g. 0,5,9")
    if frames_per_transition < 1:
        raise SeedsError(f"--frames {frames_per_transition} is invalid: give at least 1 frame per transition")
    mapper = _Mapper(G, truncation_psi, class_idx, truncation_center, class_avg_samples)
    z = seed_latents(seeds, G.z_dim)
    # Frame f lies on transition seg[f] (seeds i -> i+1) at fraction t[f]; the final frame is t = 1 of the last pair.
    total = (len(seeds) - 1) * frames_per_transition + 1
    idx = torch.arange(total)
    seg = (idx // frames_per_transition).clamp_max(len(seeds) - 2)
    t = (idx - seg * frames_per_transition).float() / frames_per_transition
    ws_seeds = mapper(z) if space == "w" else None
    for start in range(0, total, batch_size):
        s, tt = seg[start : start + batch_size], t[start : start + batch_size]
        if space == "w":
            assert ws_seeds is not None
            a, b = ws_seeds[s.to(ws_seeds.device)], ws_seeds[(s + 1).to(ws_seeds.device)]
            ws = a + (b - a) * tt.to(a.device)[:, None, None]
        else:
            ws = mapper(slerp(z[s], z[s + 1], tt))
        yield synthesize(G, ws, noise_mode)


def write_images(images: torch.Tensor, seeds: list[int], out_dir: str) -> list[str]:
    urls = []
    for image, seed in zip(to_uint8(images), seeds, strict=True):
        url = f"{out_dir.rstrip('/')}/seed{seed:04d}.png"
        save_png(image, url)
        urls.append(url)
    return urls


def write_frames(batches: Iterator[Tensor], out_dir: str) -> list[str]:
    """Frames as `frame000000.png`, `frame000001.png`, ... (ffmpeg -i frame%06d.png makes a video of them)."""
    urls: list[str] = []
    for batch in batches:
        for image in to_uint8(batch):
            url = f"{out_dir.rstrip('/')}/frame{len(urls):06d}.png"
            save_png(image, url)
            urls.append(url)
    return urls
