"""What a family's objective gives the training engine: its phases and one loss per phase.

The engine runs the phases in order; a phase runs on steps where `step % interval == 0`, updates only the
parameters of its network (`net`) and backpropagates the returned loss, which already carries the lazy
regularization gain (the interval). State an objective must carry across steps (e.g. the path-length mean) is a
buffer, so it is checkpointed with the objective's state_dict.

Augmentation (`PhaseInputs.augment`, owned and checkpointed by the engine): every image D sees, real or fake, in
every phase, goes through it first; the objective reports D's logits on reals to it
(`augment.observe_real_logits`), which is what drives ADA's p.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from pipeline.augment import Augment

Net = Literal["G", "D"]


@dataclass(frozen=True)
class Phase:
    name: str
    net: Net
    interval: int = 1


@dataclass
class PhaseInputs:
    """One phase's data: real images in [-1, 1] with their conditioning, latents for fakes, and the
    differentiable augmentation that D's inputs go through (None = none)."""

    real_img: Tensor
    real_c: Tensor | None
    gen_z: Tensor
    gen_c: Tensor | None
    augment: Augment | None = None


class Objective(nn.Module, abc.ABC):
    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The phases of one training step, in execution order."""

    @abc.abstractmethod
    def phase_loss(
        self, phase: Phase, G: nn.Module, D: nn.Module, inputs: PhaseInputs
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar to backpropagate for `phase`, and detached statistics to log (name -> scalar tensor)."""

    def reg_interval(self, net: Net) -> int | None:
        """Lazy-regularization interval of `net`'s optimizer (None when it is regularized every step or never)."""
        return None
