"""Losses, regularizers and each family's phase schedule (`base` is the contract the engine runs)."""

from __future__ import annotations

from pipeline.objectives.base import Net, Networks, Objective, Phase, PhaseInputs
from pipeline.objectives.regularizers import PathLengthRegularizer, r1_penalty
from pipeline.objectives.stylegan2 import StyleGAN2LossConfig, StyleGAN2Objective

__all__ = [
    "Net",
    "Networks",
    "Objective",
    "PathLengthRegularizer",
    "Phase",
    "PhaseInputs",
    "StyleGAN2LossConfig",
    "StyleGAN2Objective",
    "r1_penalty",
]
