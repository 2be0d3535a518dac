"""The sampler of style-based generators (StyleGAN2, StyleGAN3): truncation in W, noise modes, style mixing and
interpolation in W.

For any G with `mapping(z, c, truncation_psi=1) -> ws [N, num_ws, w_dim]` (tracking `mapping.w_avg`),
`synthesis(ws, noise_mode=...)`, `num_ws` and `w_dim`:
- Truncation: w' = center + psi * (w - center). The center is the tracked `w_avg`; for a class-conditional G given
  a class it is, by default (`truncation_center="class"`), that class's average w, estimated by mapping
  `class_avg_samples` seeded latents with the class, so truncated images stay in their class.
- `noise_mode`: `const` (the noise buffers stored with the weights: the same image every run), `random` (fresh
  noise drawn from `noise_seed`, so still reproducible) or `none` (no noise inputs).
- Style mixing (NVIDIA's style_mixing.py): in a grid of row seeds x column seeds, each cell takes the styles
  `col_styles` (w indices, coarse layers first) from its column seed and every other style from its row seed.
- Interpolation moves linearly in W between consecutive seeds' truncated w (`space="w"`), or along the great
  circle between their z before mapping (`space="z"`).
- Exported graphs take the truncation psi as an input and truncate toward the global w_avg with the stored noise
  (`noise_mode="const"`): a class's average w needs thousands of mapping passes, which belong to no graph.
- StyleGAN3 (`StyleGAN3Sampler`): `--translate X,Y` and `--rotate DEG` show the image moved and rotated, by writing
  the input transform (`pipeline.models.stylegan3.image_transform`) while a batch is drawn (`synthesize_ws`, which
  every method here draws through) and restoring the stored one afterwards; `motion_frames` moves one seed's image
  step by step from no move to the asked one (NVIDIA's videos of translation and rotation equivariance). Exported
  graphs keep the stored transform.
- Precision: on CUDA the float16 blocks (`num_fp16_res`) run as trained; elsewhere, and in exported graphs, every
  block runs in float32. float16 on a CPU is no faster (measured 0.9-1.0 s vs 0.8-1.0 s for a 256px pair) and
  moves pixels by ~1e-2; an exported graph is float32 so that any runtime reproduces it (TensorRT and the like
  make their own float16 engines from it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import SamplingError
from pipeline.models.conditioning import Cond, Request
from pipeline.models.sampling import NO_REQUEST, Program, SampleOptions, Sampler, interpolation_schedule, option
from pipeline.models.stylegan3 import image_transform

NOISE_MODES = ("const", "random", "none")
TRUNCATION_CENTERS = ("class", "global")


def truncate(ws: Tensor, center: Tensor, psi: float, cutoff: int | None = None) -> Tensor:
    """ws [N, num_ws, w_dim] -> center + psi * (ws - center) in the first `cutoff` layers (all when None)."""
    if psi == 1:
        return ws
    cutoff = ws.shape[1] if cutoff is None else cutoff
    return torch.cat([center.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], dim=1)


@dataclass(frozen=True)
class StyleGANOptions(SampleOptions):
    """What `ganpipe generate` can ask of a style-based generator (see the module docstring)."""

    truncation_psi: float = option(
        1.0, "--trunc", "truncation psi: 1 = none (default), 0 = the center itself", metavar="PSI"
    )
    truncation_center: str = option(
        "class",
        "--trunc-center",
        "class-conditional models: truncate toward the class's average w (default) or the global w_avg",
        TRUNCATION_CENTERS,
    )
    class_avg_samples: int = option(
        10_000, "--class-avg-samples", "latents mapped to estimate a class's average w (default 10000)", metavar="N"
    )
    noise_mode: str = option(
        "const",
        "--noise-mode",
        "const: the stored noise (default); random: fresh noise from --noise-seed; none: no noise",
        NOISE_MODES,
    )
    noise_seed: int = option(
        0, "--noise-seed", "seed of the noise with --noise-mode random (default 0)", metavar="SEED"
    )

    def __post_init__(self) -> None:
        if self.noise_mode not in NOISE_MODES:
            raise SamplingError(f"--noise-mode {self.noise_mode} is invalid: choose {', '.join(NOISE_MODES)}")
        if self.truncation_center not in TRUNCATION_CENTERS:
            raise SamplingError(f"--trunc-center {self.truncation_center} is invalid: choose class or global")
        if self.class_avg_samples < 1:
            raise SamplingError(f"--class-avg-samples {self.class_avg_samples} is invalid: give at least 1")


class StyleGANSampler(Sampler):
    Options: ClassVar[type[SampleOptions]] = StyleGANOptions
    interpolation_spaces: ClassVar[tuple[str, ...]] = ("w", "z")
    can_style_mix: ClassVar[bool] = True
    graph_options: ClassVar[tuple[str, ...]] = ("truncation_psi",)
    graph_fixed: ClassVar[dict[str, Any]] = {"truncation_center": "global", "noise_mode": "const"}
    graph_option_examples: ClassVar[tuple[dict[str, Any], ...]] = ({"truncation_psi": 0.7}, {"truncation_psi": 1.0})

    @classmethod
    def graph_unavailable(cls, options: SampleOptions, request: Request) -> str | None:
        opts: StyleGANOptions = options  # type: ignore[assignment]
        if opts.truncation_psi != 1 and opts.truncation_center == "class" and request.class_idx is not None:
            return (
                "--trunc with --class truncates toward the class's average w, which an exported graph does not "
                "hold: pass --trunc-center global (as the graph does) or use --runtime torch"
            )
        return super().graph_unavailable(options, request)

    @property
    def force_fp32(self) -> bool:
        """Whether the float16 blocks run in float32 here (see the module docstring)."""
        return self.device.type != "cuda"

    @torch.no_grad()
    def synthesize(self, z: Tensor, c: Cond) -> Tensor:
        return self.G(z, c, noise_mode="const", force_fp32=self.force_fp32)

    def graph_forward(self, z: Tensor, c: Cond, *options: Tensor) -> Tensor:
        (psi,) = options
        ws = self.G.mapping(z, c, truncation_psi=1)
        return self.G.synthesis(self.G.mapping.w_avg.lerp(ws, psi), noise_mode="const", force_fp32=True)

    @torch.no_grad()
    def synthesize_ws(self, ws: Tensor, options: SampleOptions | None = None, first: int = 0) -> Tensor:
        """Images [N, C, H, W] (on G's device) for ws [N, num_ws, w_dim] under `options`; with `random` noise, the
        batch whose first image is image `first` of a call draws its noise from `noise_seed + first`. Every sampler
        method draws through here."""
        opts: StyleGANOptions = self.resolve(options)
        if opts.noise_mode != "random":
            return self.G.synthesis(ws, noise_mode=opts.noise_mode, force_fp32=self.force_fp32)
        device = ws.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(opts.noise_seed + first)
            return self.G.synthesis(ws, noise_mode="random", force_fp32=self.force_fp32)

    @torch.no_grad()
    def class_w_avg(self, request: Request, num_samples: int = 10_000, seed: int = 0, batch: int = 1024) -> Tensor:
        """E[w | the request's class] from `num_samples` latents of `numpy.random.RandomState(seed)` ([w_dim])."""
        rng, device = np.random.RandomState(seed), self.device
        total = torch.zeros([self.G.w_dim], dtype=torch.float64, device=device)
        for start in range(0, num_samples, batch):
            n = min(batch, num_samples - start)
            z = torch.from_numpy(rng.randn(n, self.z_dim)).float().to(device)
            ws = self.G.mapping(z, self.conditioning.from_request(n, request, device), truncation_psi=1)
            total += ws[:, 0].double().sum(dim=0)
        return (total / num_samples).float()

    def truncation_center(self, request: Request, options: StyleGANOptions) -> Tensor:
        """The w that truncation pulls toward: the class average for a conditional G given a class, else w_avg."""
        if options.truncation_center == "class" and request.class_idx is not None:
            return self.class_w_avg(request, options.class_avg_samples)
        return self.G.mapping.w_avg

    def mapper(self, request: Request, options: SampleOptions | None = None) -> Callable[[Tensor], Tensor]:
        """z -> truncated ws for one request (the truncation center is computed once)."""
        opts: StyleGANOptions = self.resolve(options)
        device = self.device
        self.conditioning.from_request(1, request, device)  # a request that does not fit fails before any work
        psi = opts.truncation_psi
        center = self.truncation_center(request, opts) if psi != 1 else None

        @torch.no_grad()
        def run(z: Tensor) -> Tensor:
            z = z.to(device)
            ws = self.G.mapping(z, self.conditioning.from_request(z.shape[0], request, device), truncation_psi=1)
            return ws if center is None else truncate(ws, center, psi)

        return run

    def program(self, request: Request, options: SampleOptions | None = None) -> Program:
        opts: StyleGANOptions = self.resolve(options)
        to_ws = self.mapper(request, opts)
        return lambda z, first: self.synthesize_ws(to_ws(z), opts, first)

    @torch.no_grad()
    def style_mix_grid(
        self,
        row_seeds: Sequence[int],
        col_seeds: Sequence[int],
        col_styles: Sequence[int],
        request: Request = NO_REQUEST,
        options: SampleOptions | None = None,
    ) -> tuple[Tensor, tuple[int, int]]:
        """NVIDIA's style-mixing figure: (images on the CPU, (rows, cols)) for len(rows)+1 x len(cols)+1 cells.

        Row 0 holds the column seeds' own images, column 0 the row seeds' (the corner is black); cell (r, c) takes
        the styles `col_styles` from column seed c and the rest from row seed r."""
        num_ws = self.G.num_ws
        bad = [i for i in col_styles if not 0 <= i < num_ws]
        if bad or not col_styles:
            raise SamplingError(
                f"--style-layers {bad or list(col_styles)} is out of range: this generator has styles 0..{num_ws - 1}"
            )
        opts: StyleGANOptions = self.resolve(options)
        to_ws = self.mapper(request, opts)
        seeds = list(dict.fromkeys([*row_seeds, *col_seeds]))
        ws = dict(zip(seeds, to_ws(self.latents(seeds)), strict=True))
        cells: list[Tensor | None] = [None, *(ws[c] for c in col_seeds)]  # None: the blank corner
        for r in row_seeds:
            cells.append(ws[r])
            for c in col_seeds:
                mixed = ws[r].clone()
                mixed[list(col_styles)] = ws[c][list(col_styles)]
                cells.append(mixed)
        real = torch.stack([w for w in cells if w is not None])
        images = torch.cat([self.synthesize_ws(real[i : i + 16], opts, i).cpu() for i in range(0, real.shape[0], 16)])
        blank = torch.full_like(images[:1], -1.0)
        return torch.cat([blank, images]), (len(row_seeds) + 1, len(col_seeds) + 1)

    @torch.no_grad()
    def interpolation_frames(
        self,
        seeds: Sequence[int],
        frames_per_transition: int,
        space: str = "w",
        request: Request = NO_REQUEST,
        options: SampleOptions | None = None,
        batch_size: int = 16,
    ) -> Iterator[Tensor]:
        if space != "w":
            yield from super().interpolation_frames(seeds, frames_per_transition, space, request, options, batch_size)
            return
        seg, t = interpolation_schedule(len(seeds), frames_per_transition)
        opts: StyleGANOptions = self.resolve(options)
        to_ws = self.mapper(request, opts)
        ends = to_ws(self.latents(seeds))
        for start in range(0, len(seg), batch_size):
            s, tt = seg[start : start + batch_size].to(ends.device), t[start : start + batch_size].to(ends.device)
            a, b = ends[s], ends[s + 1]
            yield self.synthesize_ws(a + (b - a) * tt[:, None, None], opts, start).cpu()


def parse_translate(text: str) -> tuple[float, float]:
    """'X,Y' -> (X, Y); SamplingError naming --translate otherwise."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = (float(part) for part in parts)
    except ValueError:
        raise SamplingError(f"--translate {text!r} is invalid: give X,Y in image widths, e.g. 0.25,-0.1") from None
    if not (np.isfinite(x) and np.isfinite(y)):
        raise SamplingError(f"--translate {text!r} is invalid: X and Y must be finite numbers")
    return x, y


@dataclass(frozen=True)
class StyleGAN3Options(StyleGANOptions):
    """StyleGAN's options plus StyleGAN3's input transform (see the module docstring)."""

    translate: str | None = option(
        None,
        "--translate",
        "StyleGAN3: show the image moved by X,Y image widths (x right, y down), e.g. 0.25,0",
        metavar="X,Y",
        type=str,
    )
    rotate: float | None = option(
        None,
        "--rotate",
        "StyleGAN3: show the image rotated by DEG degrees counter-clockwise about its centre",
        metavar="DEG",
        type=float,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.translate is not None:
            parse_translate(self.translate)
        if self.rotate is not None and not np.isfinite(self.rotate):
            raise SamplingError(f"--rotate {self.rotate} is invalid: give a finite angle in degrees")

    @property
    def moves(self) -> bool:
        return self.translate is not None or self.rotate is not None

    def transform(self, amount: float = 1.0) -> Tensor:
        """The input transform that shows `amount` of the asked move (0 = none, 1 = all of it)."""
        tx, ty = parse_translate(self.translate) if self.translate is not None else (0.0, 0.0)
        return image_transform((amount * tx, amount * ty), amount * (self.rotate or 0.0))


class StyleGAN3Sampler(StyleGANSampler):
    """The StyleGAN sampler with StyleGAN3's input transform: `--translate`, `--rotate` and `motion_frames`."""

    Options: ClassVar[type[SampleOptions]] = StyleGAN3Options
    can_move: ClassVar[bool] = True
    graph_fixed: ClassVar[dict[str, Any]] = {**StyleGANSampler.graph_fixed, "translate": None, "rotate": None}

    @classmethod
    def graph_unavailable(cls, options: SampleOptions, request: Request) -> str | None:
        opts: StyleGAN3Options = options  # type: ignore[assignment]
        if opts.moves:
            return (
                "--translate and --rotate set StyleGAN3's input transform, which an exported graph holds fixed: "
                "use --runtime torch"
            )
        return super().graph_unavailable(options, request)

    @contextlib.contextmanager
    def input_transform(self, transform: Tensor | None) -> Iterator[None]:
        """G draws with `transform` as its input transform inside the block (None: the stored one), restored after."""
        if transform is None:
            yield
            return
        buffer = self.G.synthesis.input.transform
        stored = buffer.clone()
        buffer.copy_(transform.to(buffer))
        try:
            yield
        finally:
            buffer.copy_(stored)

    def moved(
        self, translate: tuple[float, float] = (0.0, 0.0), rotate_deg: float = 0.0
    ) -> contextlib.AbstractContextManager[None]:
        """G draws its image moved by `translate` image widths and turned `rotate_deg` degrees counter-clockwise
        inside the block (`image_transform`); the stored transform comes back after it."""
        return self.input_transform(image_transform(translate, rotate_deg))

    @torch.no_grad()
    def synthesize_ws(self, ws: Tensor, options: SampleOptions | None = None, first: int = 0) -> Tensor:
        opts: StyleGAN3Options = self.resolve(options)
        with self.input_transform(opts.transform() if opts.moves else None):
            return super().synthesize_ws(ws, opts, first)

    @torch.no_grad()
    def motion_frames(
        self, seed: int, num_frames: int, request: Request = NO_REQUEST, options: SampleOptions | None = None
    ) -> Iterator[Tensor]:
        """`num_frames` frames [1, C, H, W] (CPU) of seed `seed`, moving in equal steps from no move (frame 0) to the
        options' --translate/--rotate (the last frame); the latent and its truncation stay fixed."""
        opts: StyleGAN3Options = self.resolve(options)
        if not opts.moves:
            raise SamplingError("--motion moves the image: give --translate X,Y and/or --rotate DEG")
        if num_frames < 2:
            raise SamplingError(f"--motion {num_frames} is invalid: give at least 2 frames")
        ws = self.mapper(request, opts)(self.latents([seed]))
        still = dataclasses.replace(opts, translate=None, rotate=None)  # the frame's transform is set around the call
        for i in range(num_frames):
            with self.input_transform(opts.transform(i / (num_frames - 1))):
                frame = self.synthesize_ws(ws, still).cpu()
            yield frame  # with the stored transform back: the caller may stop here or use G


__all__ = [
    "NOISE_MODES",
    "TRUNCATION_CENTERS",
    "StyleGAN3Options",
    "StyleGAN3Sampler",
    "StyleGANOptions",
    "StyleGANSampler",
    "parse_translate",
    "truncate",
]
