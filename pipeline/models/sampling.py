"""Samplers: how a family's generator turns seeds, conditioning and options into images.

Everything that draws images from a generator goes through its family's sampler (`Family.sampler`): sample grids
during training, metrics (`ganpipe eval`, the evaluation callback), `ganpipe generate` and exported generators.

Contract of the base `Sampler` (any G with `z_dim` and `forward(z, c) -> images in [-1, 1]`):
- Seed s names the latent z = `numpy.random.RandomState(s).randn(z_dim)`, as NVIDIA's generate.py does, so a seed
  names the same latent in both code bases. `latents_from(generators)` draws z from torch generators instead
  (training grids and metrics: image i's latent from its own generator).
- `synthesize(z, c)`: images as training and metrics see them (no truncation; deterministic where the family
  has a choice, e.g. StyleGAN's stored noise). Returned on G's device.
- `generate(seeds, request, options)`: one image per seed for a user's `Request` (class, prompt), on the CPU.
- `interpolation_frames(...)`: frames between consecutive seeds; the base interpolates z along great circles.
- Options: each sampler class names its own `Options` dataclass (the base has none); every field carries, in its
  metadata (`option(...)`), the `ganpipe generate` flag that sets it and its help, so the CLI offers a family's
  options and no others. Passing options of another sampler is one `SamplingError` line.
- Exported graphs (`pipeline.export.graph`): `graph_options` names the options that become graph inputs (scalars,
  e.g. StyleGAN's truncation psi), `graph_fixed` the values the graph fixes of the others (its noise mode, its
  truncation center); `graph_forward(z, c, *option_tensors)` is the traceable computation, equal to `generate`
  with `graph_sample_options(values)`; `graph_unavailable` says when it is not. The base graph is `synthesize`.
All functions run under `torch.no_grad()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import SamplingError
from pipeline.models.conditioning import Cond, Conditioning, Request
from pipeline.models.graph import GraphTensor


@dataclass(frozen=True)
class OptionDoc:
    """How a sampler option appears on the command line (a field's `metadata["cli"]`)."""

    flag: str
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    type: type | None = None  # what the flag parses to; None = the type of the default


def option(
    default: Any,
    flag: str,
    help: str,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    type: type | None = None,
) -> Any:
    """A field of a sampler's `Options` dataclass with its command-line flag (`type` when the default is None)."""
    return field(default=default, metadata={"cli": OptionDoc(flag, help, choices, metavar, type)})


@dataclass(frozen=True)
class SampleOptions:
    """The base sampler's options: none. Samplers with options subclass it (`StyleGANSampler.Options`)."""


def option_docs(options_cls: type[SampleOptions]) -> dict[str, OptionDoc]:
    """Field name -> its command-line description, for every option of a sampler's `Options` class."""
    return {f.name: f.metadata["cli"] for f in fields(options_cls)}


def seed_latents(seeds: Sequence[int], z_dim: int) -> Tensor:
    """z [N, z_dim] float32 on the CPU: row i is `numpy.random.RandomState(seeds[i]).randn(z_dim)`."""
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])).float()


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


def interpolation_schedule(num_seeds: int, frames_per_transition: int) -> tuple[Tensor, Tensor]:
    """(segment, t) of every frame: `frames_per_transition` per consecutive pair of seeds, then the last seed's own
    image, (num_seeds - 1) * F + 1 frames; frame k of a transition is at t = k / F."""
    if num_seeds < 2:
        raise SamplingError("--interpolate needs at least two seeds, e.g. 0,5,9")
    if frames_per_transition < 1:
        raise SamplingError(f"--frames {frames_per_transition} is invalid: give at least 1 frame per transition")
    total = (num_seeds - 1) * frames_per_transition + 1
    idx = torch.arange(total)
    seg = (idx // frames_per_transition).clamp_max(num_seeds - 2)
    t = (idx - seg * frames_per_transition).float() / frames_per_transition
    return seg, t


NO_REQUEST = Request()  # nothing asked beyond seeds (an unconditional generator)

# A program draws the images of one request: (z [n, z_dim] on any device, index of z's first row) -> images.
Program = Callable[[Tensor, int], Tensor]


class Sampler:
    """See the module docstring. Families with more to offer subclass it (`StyleGANSampler`)."""

    Options: ClassVar[type[SampleOptions]] = SampleOptions
    interpolation_spaces: ClassVar[tuple[str, ...]] = ("z",)
    can_style_mix: ClassVar[bool] = False
    can_move: ClassVar[bool] = False  # has `motion_frames(seed, num_frames, request, options)` (StyleGAN3)
    graph_options: ClassVar[tuple[str, ...]] = ()  # Options fields an exported graph takes as scalar inputs
    graph_fixed: ClassVar[dict[str, Any]] = {}  # what an exported graph fixes of the other options
    graph_option_examples: ClassVar[tuple[dict[str, Any], ...]] = ({},)  # option values an export is verified at

    def __init__(self, G: nn.Module, conditioning: Conditioning, family: str = "") -> None:
        self.G, self.conditioning, self.family = G, conditioning, family

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    @property
    def z_dim(self) -> int:
        return int(self.G.z_dim)

    @classmethod
    def offered_options(cls) -> dict[str, OptionDoc]:
        """The options `ganpipe generate` offers for this sampler: all of its `Options`."""
        return option_docs(cls.Options)

    def resolve(self, options: SampleOptions | None) -> Any:
        """`options` checked to be this sampler's (None: every option at its default)."""
        if options is None:
            return self.Options()
        if not isinstance(options, self.Options):
            which = f"{self.family} generators" if self.family else "this generator"
            raise SamplingError(f"{which} take {self.Options.__qualname__}, not {type(options).__qualname__}")
        return options

    def latents(self, seeds: Sequence[int]) -> Tensor:
        return seed_latents(seeds, self.z_dim)

    def latents_from(self, generators: Sequence[torch.Generator]) -> Tensor:
        """z [N, z_dim] on the CPU, row i drawn from generators[i]."""
        if not generators:
            return torch.zeros((0, self.z_dim))
        return torch.stack([torch.randn([self.z_dim], generator=g) for g in generators])

    @torch.no_grad()
    def synthesize(self, z: Tensor, c: Cond) -> Tensor:
        return self.G(z, c)

    # Exported graphs -------------------------------------------------------------------------------------------

    @classmethod
    def graph_option_inputs(cls) -> list[GraphTensor]:
        """The scalar graph inputs of `graph_options`: float32 for float options, int64 for int ones."""
        defaults = {f.name: f for f in fields(cls.Options)}
        specs = []
        for name in cls.graph_options:
            dtype = "float32" if isinstance(defaults[name].default, float) else "int64"
            specs.append(GraphTensor(name, dtype, (), defaults[name].metadata["cli"].help))
        return specs

    @classmethod
    def graph_sample_options(cls, values: dict[str, Any]) -> SampleOptions:
        """The options under which `generate` draws what the graph draws with option inputs `values`."""
        return cls.Options(**cls.graph_fixed, **values)

    @classmethod
    def graph_unavailable(cls, options: SampleOptions, request: Request) -> str | None:
        """Why an exported graph cannot draw what `options` ask for `request` (None: it draws what `generate`
        would): an option the graph fixes, asked for with another value than the fixed one. Defaults pass, so
        a family whose default differs from the fixed value where it matters must say so here."""
        docs = option_docs(cls.Options)
        for name, value in cls.graph_fixed.items():
            asked, default = getattr(options, name), cls.Options.__dataclass_fields__[name].default
            if asked not in (value, default):
                return f"{docs[name].flag} {asked} is not available: the graph uses {value}"
        return None

    def moved(
        self, translate: tuple[float, float] = (0.0, 0.0), rotate_deg: float = 0.0
    ) -> contextlib.AbstractContextManager[None]:
        """A block in which G draws its images moved by `translate` image widths and turned `rotate_deg` degrees
        counter-clockwise; only samplers with `can_move` (StyleGAN3) have one."""
        which = f"{self.family} generators" if self.family else "this generator"
        raise SamplingError(f"{which} cannot be translated or rotated: they have no input transform")

    def graph_forward(self, z: Tensor, c: Cond, *options: Tensor) -> Tensor:
        """Images for z and c with the `graph_options` as tensors: what an exported graph computes."""
        return self.synthesize(z, c)

    def program(self, request: Request, options: SampleOptions | None = None) -> Program:
        """The images of `request` for any z; checks the request and the options before any work."""
        self.resolve(options)
        device = self.device
        self.conditioning.from_request(1, request, device)

        def run(z: Tensor, first: int) -> Tensor:
            return self.synthesize(z.to(device), self.conditioning.from_request(z.shape[0], request, device))

        return run

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        request: Request = NO_REQUEST,
        options: SampleOptions | None = None,
        batch_size: int = 16,
    ) -> Tensor:
        """Float images in [-1, 1], one per seed, [N, C, H, W] on the CPU."""
        run = self.program(request, options)
        z = self.latents(seeds)
        return torch.cat([run(z[i : i + batch_size], i).cpu() for i in range(0, len(seeds), batch_size)])

    @torch.no_grad()
    def interpolation_frames(
        self,
        seeds: Sequence[int],
        frames_per_transition: int,
        space: str = "z",
        request: Request = NO_REQUEST,
        options: SampleOptions | None = None,
        batch_size: int = 16,
    ) -> Iterator[Tensor]:
        """Batches of frames (CPU) from seed to seed; see `interpolation_schedule`."""
        if space not in self.interpolation_spaces:
            choices = ", ".join(self.interpolation_spaces)
            raise SamplingError(f"--interp-space {space} is not available: choose {choices}")
        seg, t = interpolation_schedule(len(seeds), frames_per_transition)
        run = self.program(request, options)
        z = self.latents(seeds)
        for start in range(0, len(seg), batch_size):
            s, tt = seg[start : start + batch_size], t[start : start + batch_size]
            yield run(slerp(z[s], z[s + 1], tt), start).cpu()


__all__ = [
    "NO_REQUEST",
    "OptionDoc",
    "Program",
    "SampleOptions",
    "Sampler",
    "interpolation_schedule",
    "option",
    "option_docs",
    "seed_latents",
    "slerp",
]
