"""What a family's objective gives the training engine: its phases and one loss per phase.

A training step consumes one real batch (its images count towards kimg and the stream position, so resume stays
exact). The engine runs the objective's phases in order; a phase runs on steps where
`step % interval == offset`, updates only the parameters of its network(s) (`nets`) and backpropagates the
returned loss, which already carries the lazy-regularization gain (the interval). "k D updates per G update, each
on fresh reals" (BigGAN) is a D phase every step and G phases with `interval=k, offset=k-1`: the k real batches
are k steps.

Networks: every family trains G and D; `Networks.extra` holds further trained networks a family builds (each
with its own optimizer), `Networks.frozen` fixed auxiliary networks a loss uses (a feature extractor, a CLIP
image tower): never trained, never checkpointed. State an objective carries across steps (e.g. the path-length
mean) is a buffer, so it is checkpointed with the objective's state_dict.

Augmentation (`PhaseInputs.augment`, owned and checkpointed by the engine): every image D sees, real or fake, in
every phase, goes through it first; the objective reports D's logits on reals to it
(`augment.observe_real_logits`), which is what drives ADA's p.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from pipeline.augment import Augment

Net = str  # "G", "D", or the name of one of a family's extra trained networks


@dataclass(frozen=True)
class Phase:
    name: str
    net: Net | tuple[Net, ...]  # the network(s) this phase trains (their optimizers step)
    interval: int = 1
    offset: int = 0
    # The loss differentiates a gradient (R1, path length). Under `train.compile` such a phase runs its networks
    # eagerly: AOTAutograd, which compiled graphs train through, has no double backward.
    double_backward: bool = False

    def __post_init__(self) -> None:
        if self.interval < 1 or not 0 <= self.offset < self.interval:
            raise ValueError(f"phase {self.name}: need interval >= 1 and 0 <= offset < interval")

    @property
    def nets(self) -> tuple[Net, ...]:
        return self.net if isinstance(self.net, tuple) else (self.net,)

    def runs_at(self, step: int) -> bool:
        return step % self.interval == self.offset


@dataclass
class PhaseInputs:
    """One phase's data: real images in [-1, 1] with their conditioning, latents for fakes, the differentiable
    augmentation that D's inputs go through (None = none), and where training stands."""

    real_img: Tensor
    real_c: Any  # the family's conditioning of the reals (None, a tensor, or a tuple of tensors)
    gen_z: Tensor
    gen_c: Any
    augment: Augment | None = None
    cur_nimg: int = 0  # images shown before this step, summed over ranks
    step: int = 0  # index of this training step (one real batch per step)


@dataclass(frozen=True)
class Networks:
    """What a phase's loss may run: G, D, further trained networks and frozen auxiliary ones."""

    G: nn.Module
    D: nn.Module
    extra: Mapping[str, nn.Module] = field(default_factory=dict)
    frozen: Mapping[str, nn.Module] = field(default_factory=dict)

    def __getitem__(self, name: str) -> nn.Module:
        if name == "G":
            return self.G
        if name == "D":
            return self.D
        if name in self.extra:
            return self.extra[name]
        return self.frozen[name]


class Objective(nn.Module, abc.ABC):
    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The phases of one training step, in execution order."""

    @abc.abstractmethod
    def phase_loss(self, phase: Phase, nets: Networks, inputs: PhaseInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar to backpropagate for `phase`, and detached statistics to log (name -> scalar tensor)."""

    def reg_interval(self, net: Net) -> int | None:
        """Lazy-regularization interval of `net`'s optimizer (None when it is regularized every step or never)."""
        return None

    def compile_units(self, nets: Networks) -> list[nn.Module]:
        """The modules `phase_loss` calls, which `train.compile` compiles (each in place, so parameters, state
        dicts and optimizers are untouched). An objective that calls parts of a network (StyleGAN's mapping and
        synthesis) names those parts; what runs between them stays eager."""
        return [nets.G, nets.D, *nets.extra.values()]

    def learning_rate(self, net: Net, optim: Any) -> float:
        """Adam's learning rate for `net` from the `optim` config section (G: g_lr, D: d_lr). A family that trains
        further networks says here what they use."""
        if net == "G":
            return float(optim.g_lr)
        if net == "D":
            return float(optim.d_lr)
        raise NotImplementedError(f"{type(self).__name__} trains network {net!r} but gives it no learning rate")
