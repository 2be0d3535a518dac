"""The export folder: `generator.safetensors` (G_ema's tensors) + `generator.json` (how to rebuild it), pickle-free.

Contract
    `generator.json` records `format: ganpipe-generator`, `version`, `family`, `model` (the family's model section:
    with `resolution` it rebuilds every network through the family registry), `resolution`, `z_dim`, `img_channels`,
    `conditioning` (the family's conditioning as `Conditioning.describe()` gives it: kind, classes, the text
    encoder's name and weight source: frozen encoders are named here, their weights stored only inside a derived
    text_encoder program), `kimg`, `source` and `networks`. Besides G_ema a folder may hold the networks training
    needs (`NETWORK_FILES`: `discriminator.safetensors`, and `generator_train.safetensors` for the non-EMA G), which
    `init=` uses. `formats` records the programs derived from the weights (`pipeline.export.derive`: ONNX,
    torch.export), each with its files, graphs (input and output names, dtypes, shapes), sha256 and the difference
    to PyTorch measured when it was written. `write_export` rebuilds and strictly loads every network before writing
    anything, writes each file atomically and the JSON last, so a folder with a generator.json is complete; new
    weights drop the programs derived from earlier ones (their records cleared first, their files deleted last).
    Reading loads tensors with safetensors and strict key checks, so nothing from the files is ever executed.
    Version 1 folders (with `c_dim` and `source_checkpoint` instead of `conditioning` and `source`) still load.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import pipeline
from pipeline.errors import ExportError, GanpipeError
from pipeline.families import Family, NetworkSpec, get_family
from pipeline.schema import section_dict
from pipeline.storage import publish_atomic

FORMAT = "ganpipe-generator"
VERSION = 2
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "generator.json"
# Network name (as in checkpoints and NVIDIA's snapshots) -> its file in an export folder.
NETWORK_FILES = {"G_ema": WEIGHTS_FILE, "D": "discriminator.safetensors", "G": "generator_train.safetensors"}


@dataclass
class ExportedGenerator:
    """What `generator.json` records."""

    family: str
    model: dict[str, Any]  # the family's model section
    resolution: int
    kimg: float = 0.0
    source: str | None = None  # the checkpoint or foreign file the networks came from
    # Filled in by `write_export` from the generator it builds and the family's conditioning:
    z_dim: int = 0
    img_channels: int = 3
    conditioning: dict[str, Any] = field(default_factory=dict)
    networks: list[str] = field(default_factory=lambda: ["G_ema"])  # which of NETWORK_FILES the folder holds
    formats: dict[str, Any] = field(default_factory=dict)  # derived programs: "onnx", "pt2" -> their record

    @property
    def family_record(self) -> Family:
        return get_family(self.family)

    def spec(self) -> NetworkSpec:
        return self.family_record.spec(self.model, self.resolution)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "ganpipe_version": pipeline.__version__, **self.__dict__}


def build_network(
    meta: ExportedGenerator, name: str, state: dict[str, torch.Tensor] | None = None, where: str = "generator.json"
) -> nn.Module:
    """G_ema, G or D of the model `meta` describes, with `state` loaded strictly when given; an ExportError names
    `where` the description came from when this ganpipe cannot build the model or the tensors do not fit it."""
    try:
        net = meta.family_record.build(name, meta.spec())
    except GanpipeError as e:
        raise ExportError(f"{where} describes a model this ganpipe cannot build ({e})") from None
    if state is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ExportError(f"{where}: {name} does not fit its recorded model ({str(e).splitlines()[0]})") from None
    return net


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
        net = build_network(meta, name, networks[name])
        tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        payloads[NETWORK_FILES[name]] = save_safetensors(tensors, metadata={"format": FORMAT, "network": name})
        if name == "G_ema":
            meta.z_dim, meta.img_channels = int(net.z_dim), int(getattr(net, "img_channels", 3))
    meta.model = section_dict(meta.spec().model)  # normalised through the schema: every key, with its default
    meta.conditioning = meta.family_record.build_conditioning(meta.spec()).describe()
    meta.networks = [n for n in NETWORK_FILES if n in networks]
    meta.formats = {}
    root = out_dir.rstrip("/")
    stale = _unlink_derived_files(root)
    for filename, data in payloads.items():
        publish_atomic(f"{root}/{filename}", data)
    write_meta(root, meta)
    fs, path = fsspec.core.url_to_fs(root)
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f"{path.rstrip('/')}/{name}")


def write_meta(export_dir: str, meta: ExportedGenerator) -> None:
    """Publish generator.json (atomically: readers see the old or the new record)."""
    publish_atomic(f"{export_dir.rstrip('/')}/{META_FILE}", json.dumps(meta.to_json(), indent=2).encode())


def derived_files(meta: ExportedGenerator, fmt: str | None = None) -> list[str]:
    """The files of the derived programs `meta` records (of format `fmt`, or of all)."""
    records = list(meta.formats.values()) if fmt is None else [meta.formats[fmt]] if fmt in meta.formats else []
    return [name for record in records for graph in record.get("graphs", {}).values() for name in graph["files"]]


def _unlink_derived_files(root: str) -> list[str]:
    """The programs an earlier export into this folder derived from its weights (stale once new weights are
    written), first dropped from its generator.json so that no record names them while the weights change."""
    if not is_export(root):
        return []
    try:
        old = read_export_meta(root)
    except ExportError:
        return []
    stale = derived_files(old)
    if stale:
        old.formats = {}
        write_meta(root, old)
    return stale


def is_export(url: str) -> bool:
    """Whether `url` is a folder holding a generator.json."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(f"{path.rstrip('/')}/{META_FILE}")


def read_export_meta(export_dir: str) -> ExportedGenerator:
    url = f"{export_dir.rstrip('/')}/{META_FILE}"
    try:
        with fsspec.open(url, "r") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ExportError(f"{url!r} does not exist: pass a folder written by `ganpipe export`") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{url!r} is not valid JSON ({e.msg}): re-run `ganpipe export`") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(f"{url!r} is not a ganpipe generator export (format={found!r})")
    if raw.get("version", 0) > VERSION:
        raise ExportError(f"{url!r} has export version {raw['version']}; upgrade ganpipe to read it")
    if raw.get("version", 0) < 2:  # version 1 named the source differently and had no conditioning record
        raw.setdefault("source", raw.get("source_checkpoint"))
    known = {f.name for f in fields(ExportedGenerator)}
    try:
        return ExportedGenerator(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise ExportError(f"{url!r} lacks a required entry ({e}): re-run `ganpipe export`") from None


def read_network_state(export_dir: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of network `name` (G_ema, D or G) in an export folder, read with safetensors."""
    url = f"{export_dir.rstrip('/')}/{NETWORK_FILES[name]}"
    try:
        with fsspec.open(url, "rb") as fh:
            return load_safetensors(fh.read())
    except FileNotFoundError:
        raise ExportError(f"{url!r} does not exist: re-run `ganpipe export` or `ganpipe convert`") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise ExportError(f"{url!r} is not a readable safetensors file ({e}): re-run `ganpipe export`") from None


__all__ = [
    "FORMAT",
    "META_FILE",
    "NETWORK_FILES",
    "VERSION",
    "WEIGHTS_FILE",
    "ExportedGenerator",
    "build_network",
    "derived_files",
    "is_export",
    "read_export_meta",
    "read_network_state",
    "write_export",
    "write_meta",
]
