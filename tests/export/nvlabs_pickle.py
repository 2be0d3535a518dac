"""Builds pickles laid out like NVIDIA's StyleGAN2-ADA network snapshots, by our own code, for converter tests.

NVIDIA's snapshot is `pickle.dump(dict(G=..., D=..., G_ema=..., augment_pipe=..., training_set_kwargs=...))`.
Each network object reduces to `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = dict(type='class', version=6, module_src=<source>, class_name=<name>, state=<module __dict__>)`, where the
state holds `_parameters`, `_buffers`, `_modules` (nested persistent objects), the hook dicts, the attributes set
in `__init__` and `_init_args` / `_init_kwargs` (kwargs given as `dnnlib.util.EasyDict`s).

We reproduce that structure: the module tree and attribute names come from our StyleGAN2 (whose names follow
NVIDIA's), the tensor values from the committed NVIDIA fixture. To pickle references to NVIDIA's module paths
without NVIDIA's code, `nvlabs_modules()` installs placeholder modules under those names for the duration of the
dump; the placeholder `_reconstruct_persistent_obj` raises, so a plain `pickle.load` of these files fails loudly.
tests/export/nvlabs3_pickle.py builds StyleGAN3 snapshots with the same pieces.
"""

from __future__ import annotations

import collections
import contextlib
import json
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from pipeline.models.stylegan2 import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    MappingConfig,
    StyleGAN2Config,
    SynthesisConfig,
)
from tests.conftest import REPO

MODULE_SRC = "# stands in for NVIDIA's training/networks.py; a converter must never execute it\nraise SystemExit(3)\n"
PLAIN = (int, float, str, bool, type(None))


def _never_called(meta: Any) -> Any:
    raise AssertionError("fixture pickles must be read by the restricted unpickler, not pickle.load")


class EasyDict(dict):
    """Pickled under the name dnnlib.util.EasyDict (see `nvlabs_modules`)."""


@contextlib.contextmanager
def nvlabs_modules() -> Iterator[None]:
    """Temporarily register `torch_utils.persistence` and `dnnlib.util` so pickle can name their globals."""
    persistence = types.ModuleType("torch_utils.persistence")
    _never_called.__module__ = "torch_utils.persistence"
    _never_called.__qualname__ = _never_called.__name__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _never_called  # type: ignore[attr-defined]
    util = types.ModuleType("dnnlib.util")
    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = EasyDict.__name__ = "EasyDict"
    util.EasyDict = EasyDict  # type: ignore[attr-defined]
    added = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    assert not any(name in sys.modules for name in added), "NVIDIA's modules are importable here; refusing to shadow"
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


class Persistent:
    """Reduces exactly like an object of an NVIDIA `@persistence.persistent_class`."""

    def __init__(self, class_name: str, state: dict[str, Any]) -> None:
        self.meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=class_name, state=state)

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def module_state(
    module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "", extra: dict[str, dict] | None = None
) -> Persistent:
    """An NVIDIA-style persistent object for `module` (recursively), with tensor values from `tensors`."""
    extra = extra or {}
    params = collections.OrderedDict(
        (n, None if p is None else nn.Parameter(tensors[f"{prefix}{n}"].clone())) for n, p in module._parameters.items()
    )
    buffers = collections.OrderedDict(
        (n, None if b is None else tensors[f"{prefix}{n}"].clone()) for n, b in module._buffers.items()
    )
    children = collections.OrderedDict(
        (n, None if m is None else module_state(m, tensors, f"{prefix}{n}.", extra)) for n, m in module._modules.items()
    )
    state: dict[str, Any] = {
        "training": False,
        "_parameters": params,
        "_buffers": buffers,
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": children,
        "_init_args": (),
        "_init_kwargs": {},
    }
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, PLAIN) or (isinstance(value, list) and all(isinstance(v, PLAIN) for v in value)):
            state[key] = value
    if "weight_gain" in state:  # NVIDIA computes it with np.sqrt, so it pickles as a numpy float64
        state["weight_gain"] = np.float64(state["weight_gain"])
    if type(module).__name__ in ("SynthesisBlock", "DiscriminatorBlock"):
        state["use_fp16"] = False
        state["channels_last"] = False
    state.update(extra.get(prefix, {}))
    return Persistent(type(module).__name__, state)


def nvlabs_snapshot_bytes(
    G: nn.Module,
    g_tensors: dict[str, torch.Tensor],
    D: nn.Module,
    d_tensors: dict[str, torch.Tensor],
    g_kwargs: dict[str, Any],
    d_kwargs: dict[str, Any],
    g_train_tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    protocol: int = 4,
    drop: tuple[str, ...] = (),
    g_attrs: dict[str, dict[str, Any]] | None = None,
    tweak: Callable[[dict[str, Any]], None] | None = None,
) -> bytes:
    """A snapshot pickle with G_ema = `g_tensors`, G = `g_train_tensors` (default the same). `g_attrs` sets
    attributes of G's modules by prefix ("synthesis.input." -> {name: value}) where NVIDIA's differ from ours;
    `tweak(snapshot)` may edit the dict of `Persistent` objects just before it is pickled."""
    with nvlabs_modules():
        g_extra = {**(g_attrs or {})}
        g_extra[""] = {**g_extra.get("", {}), "_init_kwargs": _easy(g_kwargs)}
        d_extra = {"": {"_init_kwargs": _easy(d_kwargs)}}
        augment = Persistent(
            "AugmentPipe",
            {
                "_parameters": collections.OrderedDict(),
                "_buffers": collections.OrderedDict(p=torch.zeros([])),
                "_modules": collections.OrderedDict(),
                "xflip": 1.0,
                "rotate90": 1.0,
                "brightness_std": np.float64(0.2),
                "_init_kwargs": EasyDict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1),
            },
        )
        snapshot = {
            "G": module_state(G, g_train_tensors if g_train_tensors is not None else g_tensors, extra=g_extra),
            "D": module_state(D, d_tensors, extra=d_extra),
            "G_ema": module_state(G, g_tensors, extra=g_extra),
            "augment_pipe": augment,
            "training_set_kwargs": EasyDict(
                class_name="training.dataset.ImageFolderDataset",
                path="~/datasets/fixture.zip",
                use_labels=G.c_dim > 0,
                max_size=1000,
                xflip=False,
                resolution=G.img_resolution,
            ),
            **(extra or {}),
        }
        for key in drop:
            del snapshot[key]
        if tweak is not None:
            tweak(snapshot)
        return pickle.dumps(snapshot, protocol=protocol)


def _easy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return EasyDict({k: _easy(v) for k, v in obj.items()})
    return obj


FIXTURE = REPO / "tests" / "models" / "fixtures" / "nvlabs_stylegan2_small.safetensors"


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def fixture_snapshot(
    tag: str, tmp_path: Path, protocol: int = 4, drop: tuple[str, ...] = ()
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write an NVIDIA-layout snapshot of the fixture's `tag` networks (without the keys in `drop`) under tmp_path;
    returns its path and the fixture tensors of `tag` (keys without the tag prefix)."""
    with safe_open(str(FIXTURE), "pt") as fh:
        meta = json.loads(fh.metadata()["config"])
    tensors = load_file(str(FIXTURE))
    g_arch, d_arch = tag.split("_")
    resolution = tensors[f"{tag}/real"].shape[-1]
    cfg = StyleGAN2Config(
        z_dim=meta["z_dim"],
        w_dim=meta["w_dim"],
        c_dim=meta["c_dim"],
        mapping=MappingConfig(num_layers=meta["map_layers"]),
        synthesis=SynthesisConfig(g_arch, meta["channel_base"], meta["channel_max"], meta["conv_clamp"]),
        discriminator=DiscriminatorConfig(d_arch, meta["channel_base"], meta["channel_max"], meta["conv_clamp"]),
    )
    common = {"c_dim": meta["c_dim"], "img_resolution": resolution, "img_channels": 3}
    g_kwargs = {
        "z_dim": meta["z_dim"],
        "w_dim": meta["w_dim"],
        "mapping_kwargs": {"num_layers": meta["map_layers"]},
        "synthesis_kwargs": {
            "channel_base": meta["channel_base"],
            "channel_max": meta["channel_max"],
            "num_fp16_res": 0,
            "conv_clamp": meta["conv_clamp"],
            "architecture": g_arch,
        },
        **common,
    }
    d_kwargs = {
        "architecture": d_arch,
        "channel_base": meta["channel_base"],
        "channel_max": meta["channel_max"],
        "num_fp16_res": 0,
        "conv_clamp": meta["conv_clamp"],
        "block_kwargs": {},
        "mapping_kwargs": {},
        "epilogue_kwargs": {"mbstd_group_size": 4},
        **common,
    }
    g_tensors = section(tensors, f"{tag}/G/")
    # The non-EMA G differs from G_ema in a real snapshot; shift it so the test can tell them apart.
    g_train = {k: v + 0.5 if k.endswith("bias") else v for k, v in g_tensors.items()}
    data = nvlabs_snapshot_bytes(
        Generator(cfg, resolution),
        g_tensors,
        Discriminator(cfg, resolution),
        section(tensors, f"{tag}/D/"),
        g_kwargs,
        d_kwargs,
        g_train_tensors=g_train,
        protocol=protocol,
        drop=drop,
    )
    path = tmp_path / tag / "network-snapshot-000120.pkl"  # NVIDIA's name: the kimg the snapshot was taken at
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path, {k[len(tag) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{tag}/")}
