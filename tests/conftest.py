"""Shared fixtures: a tiny, fast StyleGAN2 config on a small synthetic dataset in a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(REPO / "recipes" / "stylegan2" / "tiny.yaml")

# Small enough that a few training steps take seconds on 2 CPU cores, big enough to use every phase.
FAST_OVERRIDES = [
    "data.resolution=16",
    "data.batch_size=8",
    "data.synth.n=64",
    "model.z_dim=16",
    "model.w_dim=16",
    "model.synthesis.channel_base=256",
    "model.synthesis.channel_max=16",
    "model.discriminator.channel_base=256",
    "model.discriminator.channel_max=16",
    "train.progress_bar=false",
    "logger.csv=false",
    "eval.metrics=[]",
]


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(*overrides) -> Config for a fast run in tmp_path (run dir and dataset cache)."""

    def make(*overrides: str) -> Config:
        base = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *FAST_OVERRIDES]
        return load_config(TINY_RECIPE, [*base, *overrides])

    return make


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread for the test, restored afterwards: tiny tensors (and float16 convolutions on
    the CPU) spend most of their time in OpenMP synchronisation when several threads share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
