"""The gradient-sync seam: how a phase's gradients meet across ranks and become an optimizer step.

The engine (`GANTask`) decides *what* to compute: which phases run, which networks they train, the losses and the
gradient-accumulation rounds. A `GradientSync` decides *how* that is distributed, through one interface:

    trainer_strategy()           what Lightning's Trainer runs the processes with
    trainer_plugins()            Lightning plugins the sync needs (`train.sync_batchnorm`: cross-replica BatchNorm)
    setup(task)                  once the process group exists, before the first step
    optimizers(task)             one optimizer per trained network, in `task.net_names` order
    backward(task, loss)         one accumulation round's backward
    step(task, names, opts)      after a phase's last backward: reduce gradients over ranks, sanitise non-finite
                                 values, step the phase's optimizers
    end_step(task)               after all phases of a training step (e.g. keep running statistics equal)
    optimizer_state / load_optimizer_state   what checkpoints hold for the optimizers

`train.strategy` selects the implementation from `STRATEGIES`. `phase_sync` (the default) is ganpipe's per-phase
all-reduce (`pipeline.train.distributed`): no DDP wrapper, one bucketed all-reduce per phase after its last
backward, floating buffers averaged after every step.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch.strategies import Strategy

from pipeline.config import Config
from pipeline.errors import CheckpointError
from pipeline.train.distributed import BufferSync, CrossReplicaBatchNormSync, GANStrategy, all_reduce_gradients

if TYPE_CHECKING:
    from pipeline.train.task import GANTask


def lazy_adam_hparams(
    lr: float, betas: tuple[float, float], reg_interval: int | None
) -> tuple[float, tuple[float, float]]:
    """Adam lr/betas corrected for lazy regularization: the optimizer steps (k+1)/k as often per k batches."""
    if reg_interval is None:
        return lr, betas
    ratio = reg_interval / (reg_interval + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)


@torch.no_grad()
def sanitize_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """NaN -> 0 and +-inf -> +-1e5 in place: one bad batch must not poison Adam's moments (as StyleGAN2-ADA does)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


class GradientSync(abc.ABC):
    """See the module docstring."""

    name: ClassVar[str]

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def world_size(self) -> int:
        t = self.cfg.train
        return t.devices * t.num_nodes

    @abc.abstractmethod
    def trainer_strategy(self) -> Strategy | str: ...

    def trainer_plugins(self) -> list[Any]:
        """`train.sync_batchnorm` with several ranks: every BatchNorm becomes cross-replica while it trains."""
        return [CrossReplicaBatchNormSync()] if self.cfg.train.sync_batchnorm and self.world_size > 1 else []

    def setup(self, task: GANTask) -> None:
        """Called at the start of training on every rank, after Lightning set up the processes (default: nothing)."""
        return None

    def optimizers(self, task: GANTask) -> list[torch.optim.Optimizer]:
        """Adam per trained network: the objective's learning rate, the config's betas and eps, corrected for lazy
        regularization; frozen parameters (`freeze_d`) are left out."""
        o = self.cfg.optim
        opts = []
        for name in task.net_names:
            lr = task.objective.learning_rate(name, o)
            lr, betas = lazy_adam_hparams(lr, tuple(o.betas), task.objective.reg_interval(name))
            params = [p for p in task.net(name).parameters() if p.requires_grad]
            opts.append(torch.optim.Adam(params, lr=lr, betas=betas, eps=o.eps))
        return opts

    def backward(self, task: GANTask, loss: torch.Tensor) -> None:
        task.manual_backward(loss)

    @abc.abstractmethod
    def step(self, task: GANTask, names: Sequence[str], optimizers: Sequence[torch.optim.Optimizer]) -> None: ...

    def end_step(self, task: GANTask) -> None:
        """After all phases of a step, before the EMA (default: nothing)."""
        return None

    def optimizer_state(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in optimizers]

    def load_optimizer_state(self, optimizers: Sequence[torch.optim.Optimizer], states: list[dict[str, Any]]) -> None:
        if len(states) != len(optimizers):
            raise CheckpointError(
                f"the checkpoint holds {len(states)} optimizer states but this run trains {len(optimizers)} networks"
            )
        for opt, state in zip(optimizers, states, strict=True):
            opt.load_state_dict(state)


class PhaseSync(GradientSync):
    """ganpipe's per-phase all-reduce (see `pipeline.train.distributed` for why not DDP)."""

    name = "phase_sync"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._buffers: BufferSync | None = None

    def trainer_strategy(self) -> Strategy | str:
        if self.world_size == 1:
            return "auto"
        backend = self.cfg.train.backend
        return GANStrategy(process_group_backend=None if backend == "auto" else backend)

    def setup(self, task: GANTask) -> None:
        if task.world_size > 1:
            # The strategy has broadcast rank 0's weights and buffers; from here each step averages what changed.
            self._buffers = BufferSync([*task.trained_modules(), task.objective])
            self._buffers.mark()

    def step(self, task: GANTask, names: Sequence[str], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        params = [p for name in names for p in task.net(name).parameters()]
        all_reduce_gradients(params)  # once per phase, after its last backward (R1's double backward included)
        sanitize_gradients(params)
        for opt in optimizers:
            opt.step()

    def end_step(self, task: GANTask) -> None:
        if self._buffers is not None:
            self._buffers.sync()


STRATEGIES: dict[str, type[GradientSync]] = {PhaseSync.name: PhaseSync}


def build_sync(cfg: Config) -> GradientSync:
    return STRATEGIES[cfg.train.strategy](cfg)


__all__ = ["STRATEGIES", "GradientSync", "PhaseSync", "build_sync", "lazy_adam_hparams", "sanitize_gradients"]
