"""`train.compile` and `train.channels_last`: how the engine readies the trained networks for speed, and which
phases run compiled.

Contract:
- `prepare_networks(train, objective, nets)` puts every trained network's 4-D weights in channels_last memory order
  when `train.channels_last` is on, and with `train.compile` compiles in place (`nn.Module.compile`) each module the
  objective calls (`Objective.compile_units`: StyleGAN's mapping, synthesis and D; G, D and the family's further
  trained networks elsewhere), mode
  `train.compile_mode`, static shapes (a phase's round is always `train.batch_gpu` images). In place means
  parameters, state dicts, checkpoints, optimizers, the EMA and exports see the same modules as without it.
  G_ema (sample grids, evaluation, export) is never compiled.
- `phase_context(phase)` is what a phase's forward and backward run in: a phase whose loss differentiates a
  gradient (`Phase.double_backward`: R1, path length) calls the same modules eagerly
  (`torch.compiler.set_stance("force_eager")`), because AOTAutograd, which compiled graphs train through, has no
  double backward. Every other phase runs the compiled graphs.
- Graphs: one per module and calling context (grad on or off, which parameters train, the input's memory order):
  StyleGAN2's D compiles three (under the G phase, on fakes and on reals in the D phase). The first steps pay
  for compiling them; `ganpipe bench train` reports that apart from the steady-state speed. A context that first
  appears later compiles then (D's inputs change memory order when ADA's p leaves 0).
- Random numbers drawn inside a compiled graph (StyleGAN's noise inputs) come from Inductor's generator, seeded from
  torch's on every call: a compiled run is as reproducible and as exactly resumable as an eager one, but its noise
  differs from the eager run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pipeline.config import TrainConfig
from pipeline.objectives.base import Networks, Objective, Phase


def prepare_networks(train: TrainConfig, objective: Objective, nets: Networks) -> None:
    """Apply `train.channels_last` and `train.compile` to the trained networks."""
    if train.channels_last:
        for module in (nets.G, nets.D, *nets.extra.values()):
            module.to(memory_format=torch.channels_last)
    if train.compile:
        for module in objective.compile_units(nets):
            module.compile(mode=train.compile_mode, dynamic=False)


@contextlib.contextmanager
def phase_context(phase: Phase) -> Iterator[None]:
    """Eager for a phase that differentiates a gradient (a no-op where nothing is compiled), compiled otherwise."""
    if not phase.double_backward:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
