"""Pickle-free generator export: `generator.safetensors` (G_ema's tensors) + `generator.json` (how to rebuild it).

`export_generator` reads a checkpoint (or a run dir's newest) and writes both files atomically;
`load_generator` rebuilds the network from the JSON through the model registry and loads the tensors with
safetensors, so loading never executes anything from the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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
from pipeline.train.checkpoint import load_checkpoint, resolve_checkpoint

FORMAT = "ganpipe-generator"
VERSION = 1
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "generator.json"


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

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "ganpipe_version": pipeline.__version__, **self.__dict__}


def _write_atomic(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    tmp = f"{fs._parent(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


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
    # Rebuild and load before writing: an export that cannot be loaded back must fail here, not at generate time.
    G = _build(meta)
    G.load_state_dict(state["G_ema"])
    tensors = {k: v.detach().contiguous().cpu() for k, v in G.state_dict().items()}

    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    _write_atomic(f"{out_dir.rstrip('/')}/{WEIGHTS_FILE}", save_safetensors(tensors, metadata={"format": FORMAT}))
    _write_atomic(f"{out_dir.rstrip('/')}/{META_FILE}", json.dumps(meta.to_json(), indent=2).encode())
    return meta


def _build(meta: ExportedGenerator) -> nn.Module:
    family = get_family(meta.family)
    cfg = config_from_dict({"family": meta.family, "model": meta.model, "data": {"resolution": meta.resolution}})
    return family.build_generator(cfg.model, meta.resolution)


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


def load_generator(export_dir: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported generator in eval mode, with no unpickling."""
    meta = read_export_meta(export_dir)
    try:
        G = _build(meta)
    except (GanpipeError, KeyError) as e:
        raise ExportError(f"{export_dir!r}: generator.json describes a model this ganpipe cannot build ({e})") from None
    url = f"{export_dir.rstrip('/')}/{WEIGHTS_FILE}"
    try:
        with fsspec.open(url, "rb") as fh:
            tensors = load_safetensors(fh.read())
    except FileNotFoundError:
        raise ExportError(f"{url!r} does not exist: re-run `ganpipe export`") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise ExportError(f"{url!r} is not a readable safetensors file ({e}): re-run `ganpipe export`") from None
    try:
        G.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{url!r} does not match generator.json ({str(e).splitlines()[0]})") from None
    return G.eval().requires_grad_(False).to(device)


__all__ = ["ExportedGenerator", "export_generator", "load_generator", "read_export_meta"]
