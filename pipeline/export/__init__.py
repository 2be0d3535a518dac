"""Pickle-free generator export: `generator.safetensors` (G_ema's tensors) + `generator.json` (how to rebuild it).

`export_generator` reads a checkpoint (or a run dir's newest) and `write_export` writes the folder, each file
atomically; `ganpipe convert` writes the same folder through `write_export`. A folder may also hold the networks
training needs (`NETWORK_FILES`: `discriminator.safetensors`, and `generator_train.safetensors` for the non-EMA G),
listed in `generator.json`'s `networks`. `load_generator` rebuilds G_ema from the JSON through the model registry
and `load_networks` reads any listed network; both load tensors with safetensors and strict key checks, so
loading never executes anything from the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import pipeline
from pipeline.config import config_from_dict
from pipeline.errors import ExportError, GanpipeError
from pipeline.models import get_family
from pipeline.train.checkpoint import load_checkpoint, publish_atomic, resolve_checkpoint

FORMAT = "ganpipe-generator"
VERSION = 1
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "generator.json"
# Network name (as in checkpoints and NVIDIA's snapshots) -> its file in an export folder.
NETWORK_FILES = {"G_ema": WEIGHTS_FILE, "D": "discriminator.safetensors", "G": "generator_train.safetensors"}


@dataclass
class ExportedGenerator:
    """What `generator.json` records."""

    family: str
    model: dict[str, Any]
    resolution: int
    z_dim: int
    c_dim: int
    img_channels: int
    kimg: float
    source_checkpoint: str | None
    networks: list[str] = field(default_factory=lambda: ["G_ema"])  # which of NETWORK_FILES the folder holds

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "ganpipe_version": pipeline.__version__, **self.__dict__}


def _write_atomic(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    publish_atomic(fs, path, data)  # the checkpoints' writer: rename on file systems, one-shot on object stores


def export_generator(source: str, out_dir: str) -> ExportedGenerator:
    """Write G_ema of the checkpoint `source` (a file or a run dir) to `out_dir` as safetensors + JSON."""
    ckpt_url = resolve_checkpoint(source)
    state = load_checkpoint(ckpt_url)
    cfg = config_from_dict(state["config"])
    meta = ExportedGenerator(
        family=cfg.family,
        model=state["config"]["model"],
        resolution=cfg.data.resolution,
        z_dim=cfg.model.z_dim,
        c_dim=cfg.model.c_dim,
        img_channels=cfg.model.img_channels,
        kimg=state["counters"]["cur_nimg"] / 1000,
        source_checkpoint=ckpt_url,
    )
    write_export(out_dir, meta, {"G_ema": state["G_ema"]})
    return meta


def write_export(out_dir: str, meta: ExportedGenerator, networks: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write `networks` (name in NETWORK_FILES -> state dict; G_ema required) and generator.json to `out_dir`.

    Every network is rebuilt from `meta` and loaded strictly before anything is written: an export that cannot
    be loaded back must fail here, not at generate or train time. The JSON goes last, so a folder with a
    generator.json is complete.
    """
    unknown = sorted(set(networks) - set(NETWORK_FILES))
    if "G_ema" not in networks or unknown:
        raise ExportError(f"an export holds G_ema and optionally D, G; got {sorted(networks)}")
    payloads = {}
    for name in [n for n in NETWORK_FILES if n in networks]:  # fixed order: G_ema, D, G
        net = _build(meta, discriminator=(name == "D"))
        try:
            net.load_state_dict(networks[name], strict=True)
        except RuntimeError as e:
            raise ExportError(f"{name} does not match the model in generator.json ({str(e).splitlines()[0]})") from None
        tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        payloads[NETWORK_FILES[name]] = save_safetensors(tensors, metadata={"format": FORMAT, "network": name})
    meta.networks = [n for n in NETWORK_FILES if n in networks]
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    for filename, data in payloads.items():
        _write_atomic(f"{out_dir.rstrip('/')}/{filename}", data)
    _write_atomic(f"{out_dir.rstrip('/')}/{META_FILE}", json.dumps(meta.to_json(), indent=2).encode())


def _build(meta: ExportedGenerator, discriminator: bool = False) -> nn.Module:
    family = get_family(meta.family)
    cfg = config_from_dict({"family": meta.family, "model": meta.model, "data": {"resolution": meta.resolution}})
    build = family.build_discriminator if discriminator else family.build_generator
    return build(cfg.model, meta.resolution)


def read_export_meta(export_dir: str) -> ExportedGenerator:
    url = f"{export_dir.rstrip('/')}/{META_FILE}"
    try:
        with fsspec.open(url, "r") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ExportError(f"{url!r} does not exist: pass a folder written by `ganpipe export`") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{url!r} is not valid JSON ({e.msg}): re-run `ganpipe export`") from None
    if raw.get("format") != FORMAT:
        raise ExportError(f"{url!r} is not a ganpipe generator export (format={raw.get('format')!r})")
    if raw.get("version", 0) > VERSION:
        raise ExportError(f"{url!r} has export version {raw['version']}; upgrade ganpipe to read it")
    fields = ExportedGenerator.__dataclass_fields__
    return ExportedGenerator(**{k: v for k, v in raw.items() if k in fields})


def _load_network(export_dir: str, meta: ExportedGenerator, name: str) -> nn.Module:
    try:
        net = _build(meta, discriminator=(name == "D"))
    except (GanpipeError, KeyError) as e:
        raise ExportError(f"{export_dir!r}: generator.json describes a model this ganpipe cannot build ({e})") from None
    url = f"{export_dir.rstrip('/')}/{NETWORK_FILES[name]}"
    try:
        with fsspec.open(url, "rb") as fh:
            tensors = load_safetensors(fh.read())
    except FileNotFoundError:
        raise ExportError(f"{url!r} does not exist: re-run `ganpipe export` or `ganpipe convert`") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise ExportError(f"{url!r} is not a readable safetensors file ({e}): re-run `ganpipe export`") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{url!r} does not match generator.json ({str(e).splitlines()[0]})") from None
    return net


def load_generator(export_dir: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported generator (G_ema) in eval mode, with no unpickling."""
    meta = read_export_meta(export_dir)
    return _load_network(export_dir, meta, "G_ema").eval().requires_grad_(False).to(device)


def load_networks(export_dir: str) -> tuple[ExportedGenerator, dict[str, nn.Module]]:
    """Every network the folder lists (G_ema, and D / G when written), on the CPU, as they were saved."""
    meta = read_export_meta(export_dir)
    names = [n for n in NETWORK_FILES if n in meta.networks]
    return meta, {name: _load_network(export_dir, meta, name) for name in names}


__all__ = [
    "NETWORK_FILES",
    "ExportedGenerator",
    "export_generator",
    "load_generator",
    "load_networks",
    "read_export_meta",
    "write_export",
]
