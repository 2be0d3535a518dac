"""Losses, regularizers and each family's phase schedule; one registry of objectives by family name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.objectives.base import Objective, Phase, PhaseInputs
from pipeline.objectives.regularizers import PathLengthRegularizer, r1_penalty
from pipeline.objectives.stylegan2 import StyleGAN2LossConfig, StyleGAN2Objective

OBJECTIVES: dict[str, tuple[type, Callable[[Any], Objective]]] = {
    "stylegan2": (StyleGAN2LossConfig, StyleGAN2Objective),
}
OBJECTIVE_CONFIGS: dict[str, type] = {name: cls for name, (cls, _) in OBJECTIVES.items()}


def build_objective(family: str, cfg: Any) -> Objective:
    return OBJECTIVES[family][1](cfg)


__all__ = [
    "OBJECTIVES",
    "OBJECTIVE_CONFIGS",
    "Objective",
    "PathLengthRegularizer",
    "Phase",
    "PhaseInputs",
    "StyleGAN2LossConfig",
    "StyleGAN2Objective",
    "build_objective",
    "r1_penalty",
]
