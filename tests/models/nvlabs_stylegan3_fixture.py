"""The committed NVIDIA StyleGAN3 fixtures (`tests/models/fixtures/nvlabs_stylegan3_{t,r}.safetensors`, made by
tools/fixtures/make_nvlabs_stylegan3_fixture.py, whose docstring lists their contents): their metadata and tensors,
and our config of the generators they hold. Shared by the model, converter and metric tests."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.models.stylegan3 import MappingConfig, StyleGAN3Config, SynthesisConfig

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_path(tag: str) -> Path:
    return FIXTURES / f"nvlabs_stylegan3_{tag}.safetensors"


@cache
def fixture(tag: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config, per-resolution NVIDIA layer design, tensors) of nvlabs_stylegan3_{tag}.safetensors."""
    path = fixture_path(tag)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    return json.loads(meta["config"]), json.loads(meta["layers"]), load_file(str(path))


def fixture_config(meta: dict[str, Any]) -> StyleGAN3Config:
    """Our model section of the generator a fixture's `config` metadata describes (StyleGAN2's default D)."""
    return StyleGAN3Config(
        z_dim=meta["z_dim"],
        w_dim=meta["w_dim"],
        c_dim=meta["c_dim"],
        mapping=MappingConfig(num_layers=meta["map_layers"]),
        synthesis=SynthesisConfig(
            conv_kernel=meta["conv_kernel"],
            use_radial_filters=meta["use_radial_filters"],
            channel_base=meta["channel_base"],
            channel_max=meta["channel_max"],
            conv_clamp=meta["conv_clamp"],
            num_fp16_res=meta["num_fp16_res"],
        ),
    )
