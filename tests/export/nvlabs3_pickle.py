"""Builds pickles laid out like NVIDIA's StyleGAN3 (`--cfg=stylegan3-t` / `-r`) network snapshots, by our own code,
for converter tests; and finds a checkout of NVIDIA's StyleGAN3 for the tests that use NVIDIA's own code.

The layout is the one tests/export/nvlabs_pickle.py reproduces for StyleGAN2 (persistent objects holding each
module's `__dict__`): G's module tree and attributes come from our StyleGAN3 generator, whose names follow NVIDIA's
`training/networks_stylegan3.py`, with the attribute types NVIDIA's code stores (sizes as numpy [width, height]
arrays, cutoffs and half-widths as numpy floats, float16 flags as numpy bools) and the SynthesisNetwork attributes
only NVIDIA keeps (`nvlabs_attrs`). The tensors are NVIDIA's, from the committed fixtures
tests/models/fixtures/nvlabs_stylegan3_{t,r}.safetensors (made by NVIDIA's code, including a non-identity
`synthesis.input.transform`). G's `_init_kwargs` are the ones NVIDIA's train.py passes (`train_py_kwargs` of
tools/fixtures/make_nvlabs_stylegan3_snapshot.py). D is our StyleGAN2 discriminator with seeded random weights.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.models.stylegan2 import Discriminator, DiscriminatorConfig
from pipeline.models.stylegan3 import Generator, StyleGAN3Config
from tests.conftest import REPO
from tests.export.nvlabs_pickle import Persistent, nvlabs_snapshot_bytes, section
from tests.models.nvlabs_stylegan3_fixture import fixture, fixture_config

SNAPSHOT_TOOL = REPO / "tools" / "fixtures" / "make_nvlabs_stylegan3_snapshot.py"
CHECKOUT_VARIABLE = "GANPIPE_NVLABS_STYLEGAN3_CHECKOUT"
MIRROR = Path(os.environ.get("GANPIPE_MIRROR", "/work/.mirror")) / "NVlabs+stylegan3"


@functools.cache
def snapshot_tool() -> ModuleType:
    """tools/fixtures/make_nvlabs_stylegan3_snapshot.py (tools/ is no package), for `train_py_kwargs`."""
    spec = importlib.util.spec_from_file_location("make_nvlabs_stylegan3_snapshot", SNAPSHOT_TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Fixture:
    """One resolution of an NVIDIA StyleGAN3 fixture: its `config` metadata and tensors (keys without `{res}/`)."""

    tag: str
    resolution: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def g_state(self) -> dict[str, torch.Tensor]:
        return section(self.tensors, "G/")

    def config(self) -> StyleGAN3Config:
        """Our config of the fixture's networks; D gets the channels and conv_clamp NVIDIA's train.py gives it."""
        _, d_kwargs = snapshot_tool().train_py_kwargs(self.meta, self.resolution)
        discriminator = DiscriminatorConfig(
            channel_base=d_kwargs["channel_base"], channel_max=d_kwargs["channel_max"], conv_clamp=256
        )
        return dataclasses.replace(fixture_config(self.meta), discriminator=discriminator)


def load_fixture(tag: str, resolution: int) -> Fixture:
    meta, _, tensors = fixture(tag)
    return Fixture(tag, resolution, meta, section(tensors, f"{resolution}/"))


FLOAT_ATTRS = ("in_cutoff", "out_cutoff", "in_half_width", "out_half_width")  # numpy floats in NVIDIA's layers


def _wh(side: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(side), [2])  # NVIDIA's [width, height]


def nvlabs_attrs(G: Generator) -> dict[str, dict[str, Any]]:
    """G's attributes as NVIDIA's StyleGAN3 code stores them, by module prefix, where ours differ in type."""
    s, cfg = G.synthesis, G.cfg.synthesis
    inp = s.input
    attrs: dict[str, dict[str, Any]] = {
        "synthesis.": {
            "num_critical": cfg.num_critical,
            "margin_size": cfg.margin_size,
            "num_fp16_res": cfg.num_fp16_res,
        },
        "synthesis.input.": {
            "size": _wh(inp.size),
            "sampling_rate": np.float64(inp.sampling_rate),
            "bandwidth": np.float64(inp.bandwidth),
        },
    }
    for name, layer in zip(s.layer_names, s.layers(), strict=True):
        attrs[f"synthesis.{name}."] = {
            "in_size": _wh(layer.in_size),
            "out_size": _wh(layer.out_size),
            "use_fp16": np.bool_(layer.use_fp16),
            **{k: np.float64(getattr(layer, k)) for k in FLOAT_ATTRS},
        }
    return attrs


def persistent_at(root: Persistent, path: str) -> Persistent:
    """The persistent object at a dotted module path ("" = root) of a snapshot built here."""
    obj = root
    for name in filter(None, path.split(".")):
        obj = obj.meta["state"]["_modules"][name]
    return obj


def stylegan3_snapshot(
    tag: str,
    resolution: int,
    path: Path,
    g_kwargs: Callable[[dict[str, Any]], None] | None = None,
    tweak: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, Fixture]:
    """Write a StyleGAN3 snapshot of fixture `tag` at `resolution` to `path`; `g_kwargs(kwargs)` may edit G's
    constructor kwargs and `tweak(snapshot)` the objects before pickling. The non-EMA G's biases are G_ema's + 0.5
    so that tests can tell them apart. Returns the path and the fixture."""
    fx = load_fixture(tag, resolution)
    cfg = fx.config()
    kwargs, d_kwargs = snapshot_tool().train_py_kwargs(fx.meta, resolution)
    if g_kwargs is not None:
        g_kwargs(kwargs)
    G = Generator(cfg, resolution, magnitude_ema_beta=fx.meta["magnitude_ema_beta"])
    torch.manual_seed(0)
    D = Discriminator(cfg, resolution)
    g_train = {k: v + 0.5 if k.endswith("bias") else v for k, v in fx.g_state.items()}
    data = nvlabs_snapshot_bytes(
        G,
        fx.g_state,
        D,
        D.state_dict(),
        kwargs,
        d_kwargs,
        g_train_tensors=g_train,
        g_attrs=nvlabs_attrs(G),
        tweak=tweak,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, fx


def nvlabs_stylegan3_checkout(tmp_root: Path) -> Path:
    """A checkout of NVlabs/stylegan3: ${GANPIPE_NVLABS_STYLEGAN3_CHECKOUT}, else a clone of the local bare mirror
    under $GANPIPE_MIRROR (default /work/.mirror) into `tmp_root`; the calling test skips, saying why, without
    either."""
    given = os.environ.get(CHECKOUT_VARIABLE)
    if given:
        return Path(given)
    for git_dir in (MIRROR, MIRROR / "repo"):
        if (git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir():
            dest = tmp_root / "stylegan3"
            subprocess.run(["git", "clone", "-q", str(git_dir), str(dest)], check=True, timeout=300)
            return dest
    pytest.skip(f"no NVIDIA StyleGAN3 checkout: set {CHECKOUT_VARIABLE} to a checkout of NVlabs/stylegan3 (CI: none)")


def nvidia_snapshot(checkout: Path, tag: str, resolution: int, out: Path, check: Path) -> None:
    """Run NVIDIA's code in a subprocess (tools/fixtures/make_nvlabs_stylegan3_snapshot.py) to pickle a real
    snapshot of fixture `tag` at `resolution` to `out`, with NVIDIA's D and G_ema outputs in `check`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    args = [str(checkout), "--tag", tag, "--resolution", str(resolution), "--out", str(out), "--check", str(check)]
    done = subprocess.run(
        [sys.executable, str(SNAPSHOT_TOOL), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
