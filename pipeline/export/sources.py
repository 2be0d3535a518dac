"""One way to get networks from anything a user points at: an export folder, a ganpipe checkpoint or run dir, or
a foreign checkpoint a converter reads (NVIDIA's StyleGAN2-ADA pickles, ...). `init=` (training), `ganpipe
export`, `ganpipe eval` and `ganpipe generate` all go through `open_networks`.

Contract
    `open_networks(url, training)` returns a `NetworkSource`: the family, its model section, the resolution and
    state dicts by checkpoint name ("G_ema" always; with `training`, "G" and "D" when the source has them: what
    `init=` needs), read without executing anything
    (safetensors, `torch.load(weights_only=True)`, or a converter's restricted unpickler). `build(name)` rebuilds
    a network through the family registry and loads it strictly; `sampler(device)` gives G_ema's sampler.

Converters live in `pipeline.export.converters` (one module each, discovered on first use) and register a
`Converter`: a name (`ganpipe convert NAME`), whether it claims a URL, and how it reads one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from pipeline.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from pipeline.errors import ExportError
from pipeline.export.format import ExportedGenerator, build_network, is_export, read_export_meta, read_network_state
from pipeline.families import Family, NetworkSpec, get_family
from pipeline.models.sampling import Sampler

NETWORK_NAMES = ("G_ema", "G", "D")


@dataclass
class NetworkSource:
    """Networks read from a source (see the module docstring)."""

    url: str
    family: str
    model: dict[str, Any]  # the family's model section
    resolution: int
    states: dict[str, dict[str, Tensor]]  # "G_ema" always; "G" and "D" when the source has them
    kimg: float | None = None
    config: dict[str, Any] | None = None  # the training config, when the source is a ganpipe checkpoint
    notes: list[str] = field(default_factory=list)  # what a converter wants the user to know

    @property
    def family_record(self) -> Family:
        return get_family(self.family)

    def spec(self) -> NetworkSpec:
        return self.family_record.spec(self.model, self.resolution)

    def build(self, name: str = "G_ema") -> nn.Module:
        """Network `name` rebuilt through the family registry with the source's tensors (strict), on the CPU."""
        if name not in self.states:
            raise ExportError(f"{self.url!r} holds no {name} (it has {', '.join(sorted(self.states))})")
        return build_network(self.export_record(), name, self.states[name], self.url)

    def sampler(self, device: str | torch.device = "cpu") -> Sampler:
        """G_ema's sampler, in eval mode on `device`."""
        G = self.build("G_ema").eval().requires_grad_(False).to(device)
        family = self.family_record
        sampler = family.make_sampler(G, family.build_conditioning(self.spec()))
        for module in sampler.conditioning.modules().values():
            module.to(device)
        return sampler

    def export_record(self) -> ExportedGenerator:
        return ExportedGenerator(self.family, self.model, self.resolution, self.kimg or 0.0, self.url)


@dataclass(frozen=True)
class Converter:
    """A reader of foreign checkpoints (see the module docstring)."""

    name: str  # `ganpipe convert NAME`
    help: str  # one line for `ganpipe convert --help`
    claims: Callable[[str], bool]  # whether a URL is this converter's (e.g. an NVIDIA .pkl)
    read: Callable[[str, bool], NetworkSource]  # (url, training): G_ema; with training also G and D where present


_CONVERTERS: dict[str, Converter] = {}
_discovered = False


def register_converter(converter: Converter) -> Converter:
    _CONVERTERS[converter.name] = converter
    return converter


def available_converters() -> dict[str, Converter]:
    """Every converter, by name (the modules of `pipeline.export.converters` are imported on first use)."""
    global _discovered
    if not _discovered:
        _discovered = True
        package = importlib.import_module("pipeline.export.converters")
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(_CONVERTERS)


def _from_export(url: str, names: tuple[str, ...]) -> NetworkSource:
    meta = read_export_meta(url)
    states = {name: read_network_state(url, name) for name in meta.networks if name in names}
    return NetworkSource(url, meta.family, meta.model, meta.resolution, states, meta.kimg)


def _from_checkpoint(url: str, names: tuple[str, ...]) -> NetworkSource:
    ckpt = resolve_checkpoint(url)
    state = load_checkpoint(ckpt)
    config = state["config"]
    states = {name: state[name] for name in names if name in state}
    kimg = state["counters"]["cur_nimg"] / 1000
    return NetworkSource(ckpt, state["family"], config["model"], config["data"]["resolution"], states, kimg, config)


def open_networks(url: str, training: bool = False) -> NetworkSource:
    """Networks from an export folder, a foreign checkpoint a converter claims, or a ganpipe checkpoint / run dir:
    G_ema, and with `training` (what `init=` needs) also the non-EMA G and D where the source has them."""
    names = NETWORK_NAMES if training else ("G_ema",)
    if is_export(url):
        return _from_export(url, names)
    for converter in available_converters().values():
        if converter.claims(url):
            return converter.read(url, training)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ExportError(
            f"{url!r} does not exist: pass an export folder, a checkpoint, a run dir or a file `ganpipe convert` reads"
        )
    if fs.isdir(path) and not list_checkpoints(url):
        raise ExportError(
            f"{url!r} is neither an export folder (no generator.json) nor a run dir with checkpoints: pass the folder "
            "`ganpipe export` wrote, a run dir, a checkpoint or a file `ganpipe convert` reads"
        )
    return _from_checkpoint(url, names)


__all__ = [
    "NETWORK_NAMES",
    "Converter",
    "NetworkSource",
    "available_converters",
    "open_networks",
    "register_converter",
]
