"""Pickle-free export of trained generators, reading networks from any source, and conversion of official
checkpoints.

    export_generator(source, out_dir, formats)  `ganpipe export`: G_ema of a checkpoint / run dir (or any source)
                                           as safetensors, plus ONNX / torch.export programs derived from it
    convert(name, source, out_dir, ...)    `ganpipe convert NAME`: a foreign checkpoint to an export folder
    load_generator(dir) / load_sampler(src)  a generator, or its family's sampler, ready to draw images
    open_networks(src)                     networks of an export, checkpoint, run dir or convertible file

The folder format is `pipeline.export.format`; sources and the converter registry are `pipeline.export.sources`;
derived programs are `pipeline.export.graph` (what they compute), `pipeline.export.derive` (writing and verifying
them) and `pipeline.export.runtime` (running them).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ExportError
from pipeline.export.derive import GRAPH_FORMATS, check_derivable, derive_formats
from pipeline.export.format import (
    META_FILE,
    NETWORK_FILES,
    WEIGHTS_FILE,
    ExportedGenerator,
    is_export,
    read_export_meta,
    write_export,
)
from pipeline.export.sources import NetworkSource, available_converters, open_networks
from pipeline.models.sampling import Sampler
from pipeline.storage import canonical_url, user_url


def _write(source: NetworkSource, out_dir: str, names: tuple[str, ...]) -> ExportedGenerator:
    meta = source.export_record()
    with user_url("--out", out_dir):
        write_export(out_dir, meta, {name: source.states[name] for name in names if name in source.states})
    return meta


def _open(source: str, training: bool = False) -> NetworkSource:
    with user_url("source", source):
        return open_networks(source, training)


def export_generator(
    source: str,
    out_dir: str,
    formats: tuple[str, ...] | list[str] = ("safetensors",),
    uint8: bool = False,
    tolerance: float | None = None,
) -> ExportedGenerator:
    """Write G_ema of `source` (a checkpoint, a run dir's newest checkpoint, or any `open_networks` source) to
    `out_dir` as safetensors + JSON, then the derived `formats` (onnx, pt2; `uint8`: images as uint8 NHWC) from it.

    The safetensors are the source of truth and always written, except when `source` is `out_dir` itself (an
    export folder): then only the derived formats are added to it."""
    derived = [f for f in formats if f in GRAPH_FORMATS]
    if (uint8 or tolerance is not None) and not derived:
        what = "--uint8 shapes the images" if uint8 else "--tolerance bounds the difference"
        raise ExportError(f"{what} of derived programs: add --format onnx or --format pt2")
    check_derivable(derived)
    with user_url("source", source):
        in_place = is_export(source) and canonical_url(source) == canonical_url(out_dir)
    meta = read_export_meta(out_dir) if in_place else _write(_open(source), out_dir, ("G_ema",))
    if derived:
        with user_url("--out", out_dir):
            meta = derive_formats(out_dir, derived, uint8, tolerance)
    return meta


def convert(
    name: str, source: str, out_dir: str, with_discriminator: bool = False
) -> tuple[ExportedGenerator, list[str]]:
    """`ganpipe convert NAME`: read `source` with converter `name` and write an export folder (G_ema; with
    `with_discriminator` also D and the non-EMA G, which `init=` uses). Returns the record and the converter's
    notes for the user."""
    available = available_converters()
    if name not in available:
        raise ExportError(f"no converter {name!r}: choose one of {', '.join(sorted(available))}")
    with user_url("source", source):
        nets = available[name].read(source, with_discriminator)
    if with_discriminator and "D" not in nets.states:
        why = "; ".join(nets.notes) or "the file has none"
        raise ExportError(f"{source!r}: no discriminator to convert ({why}); drop --discriminator")
    names = ("G_ema", "D", "G") if with_discriminator else ("G_ema",)
    return _write(nets, out_dir, names), nets.notes


def load_generator(export_dir: str, device: str | torch.device = "cpu") -> nn.Module:
    """An exported generator (G_ema) in eval mode, rebuilt with no unpickling."""
    with user_url("export", export_dir):
        read_export_meta(export_dir)  # a missing or foreign generator.json is reported as such
    return _open(export_dir).build("G_ema").eval().requires_grad_(False).to(device)


def load_sampler(source: str, device: str | torch.device = "cpu") -> Sampler:
    """The family sampler of G_ema from an export folder, checkpoint, run dir or convertible file."""
    return _open(source).sampler(device)


__all__ = [
    "META_FILE",
    "NETWORK_FILES",
    "WEIGHTS_FILE",
    "ExportedGenerator",
    "NetworkSource",
    "convert",
    "export_generator",
    "load_generator",
    "load_sampler",
    "open_networks",
    "read_export_meta",
    "write_export",
]
