"""Data-parallel GAN training: per-phase gradient sync, state broadcast, and the Lightning strategy that hosts them.

Why not Lightning's DDP: DistributedDataParallel wraps the whole LightningModule and all-reduces in backward
hooks, once per backward. A GAN step has several phases, each with its own network and optimizer; R1 adds a
double backward (`autograd.grad(create_graph=True)` then `backward`) and lazy regularization skips phases on most
steps, so DDP's hooks fire at the wrong times or wait for parameters that never get a gradient (the usual
`find_unused_parameters` workaround). Here the engine decides instead:

Contract
    * `GANStrategy` is Lightning's DDP strategy for everything around the model (launching or joining the
      processes, ranks, the process group: NCCL on GPU, gloo on CPU, collectives, barriers) but never wraps the
      module. When it is set up it broadcasts every parameter and buffer from rank 0, so all ranks start alike.
    * `all_reduce_gradients(params)` averages the gradients of one phase's parameters over the ranks, once, in
      buckets of about `bucket_mb` (all buckets in flight at once, then waited). A parameter without a gradient
      counts as a zero gradient, so every rank reduces the same layout whatever its graph used. The engine calls it
      after the phase's last backward (after all gradient-accumulation rounds) and before the optimizer step.
    * `BufferSync` keeps running statistics that each rank updates from its own data (StyleGAN's `w_avg`, the
      path-length mean, batch-norm statistics without SyncBatchNorm) equal on all ranks: after each step every
      floating buffer becomes the mean of the ranks' values. It reduces the change since the last sync, so a buffer
      no rank changed (noise constants, filters) stays bit-identical, and one that all changed alike is averaged
      exactly as one process with the whole batch would have updated it.
    * `rank_seed(seed, rank)` gives each rank its own latent/noise stream (same seed on every rank would draw the
      same latents everywhere and waste half of the batch).

With these, K steps of R ranks with B/R images each end with the same G, D and G_ema as one process with B
images (up to float rounding), which `tests/train/test_distributed.py` checks with two gloo processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from pipeline.nn.batchnorm import convert_batchnorm

log = logging.getLogger(__name__)

DEFAULT_BUCKET_MB = 25.0  # DDP's default bucket size: large enough to saturate NCCL, small enough to overlap


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def leave_process_group() -> None:
    """End this rank's part in the job's process group in step with the others: a barrier, then the group's
    destruction. Ranks that instead exit one by one, leaving it to interpreter shutdown, can tear a peer's
    gloo connections down while it is still closing them, which aborts that peer (seen once in 19 runs of the
    two-rank tests) and would fail a finished Slurm task. No-op without a process group."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped into buckets of one dtype and device, each at most ~bucket_bytes."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in groups or sizes[key] + nbytes > bucket_bytes:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [bucket for buckets in groups.values() for bucket in buckets if bucket]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).clone()


def _unflat_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


@torch.no_grad()
def all_reduce_gradients(
    params: Iterable[nn.Parameter], bucket_mb: float = DEFAULT_BUCKET_MB, group: Any = None
) -> None:
    """Average `.grad` of `params` over all ranks (a no-op in a single process). Missing gradients count as zero."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    world = dist.get_world_size(group)
    pending = []
    for bucket in _buckets(grads, int(bucket_mb * 2**20)):
        tensors = [grads[i] for i in bucket]
        flat = _flat(tensors)
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, tensors))
    for work, flat, tensors in pending:
        work.wait()
        _unflat_into(flat.div_(world), tensors)


@torch.no_grad()
def broadcast_module_states(module: nn.Module, src: int = 0, bucket_mb: float = 250.0, group: Any = None) -> None:
    """Every parameter and buffer of `module` takes rank `src`'s value (bucketed broadcasts)."""
    if not is_distributed():
        return
    tensors = [t.data for t in (*module.parameters(), *module.buffers())]
    for bucket in _buckets(tensors, int(bucket_mb * 2**20)):
        parts = [tensors[i] for i in bucket]
        flat = _flat(parts)
        dist.broadcast(flat, src=src, group=group)
        _unflat_into(flat, parts)


class BufferSync:
    """Averages the floating buffers of some modules over the ranks (see the module docstring).

    `mark()` records the synced values; `sync()` all-reduces the change since then in one collective per bucket
    and sets every buffer to `marked + mean change`, then marks again.
    """

    def __init__(self, modules: Sequence[nn.Module], bucket_mb: float = 250.0) -> None:
        self.buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._marked: list[Tensor] | None = None

    @torch.no_grad()
    def mark(self) -> None:
        self._marked = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def sync(self, group: Any = None) -> None:
        if not is_distributed() or not self.buffers:
            return
        if self._marked is None:
            raise RuntimeError("BufferSync.sync() before mark(): broadcast the states first, then mark()")
        world = dist.get_world_size(group)
        deltas = [b - m for b, m in zip(self.buffers, self._marked, strict=True)]
        pending = []
        for bucket in _buckets(deltas, self.bucket_bytes):
            parts = [deltas[i] for i in bucket]
            flat = _flat(parts)
            pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, bucket))
        for work, flat, bucket in pending:
            work.wait()
            _unflat_into(flat.div_(world), [deltas[i] for i in bucket])  # deltas now hold the mean change
        for b, m, d in zip(self.buffers, self._marked, deltas, strict=True):
            b.copy_(m + d)  # marked + 0 == marked bit for bit, so buffers nobody changed never drift
        self.mark()


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for `rank`'s RNG stream, independent across ranks and of the single-process stream."""
    digest = hashlib.sha256(f"ganpipe-rank-seed:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GANStrategy(DDPStrategy):
    """Lightning's DDP process management without the DDP wrapper (see the module docstring).

    The engine (`GANTask`) all-reduces each phase's gradients itself via `all_reduce_gradients`.
    """

    strategy_name = "gan_ddp"

    def configure_ddp(self) -> None:
        assert isinstance(self.model, L.LightningModule)
        broadcast_module_states(self.model)


class CrossReplicaBatchNormSync(LayerSync):
    """`train.sync_batchnorm`: every BatchNorm of the task becomes a `CrossReplicaBatchNorm` while it trains (batch
    statistics over all ranks and nodes, on gloo and NCCL alike; torch's SyncBatchNorm refuses CPU tensors)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_batchnorm(model, to_cross_replica=True)

    def revert(self, model: nn.Module) -> nn.Module:
        return convert_batchnorm(model, to_cross_replica=False)


def slurm_environment() -> SLURMEnvironment | None:
    """Lightning's SLURMEnvironment when this process is a task of a Slurm batch job (ranks from SLURM_PROCID,
    SLURM_LOCALID, SLURM_NODEID; master address from the node list), else None.

    Lightning's own auto-requeue is off: it saves a checkpoint inside the signal handler, which can hang in a
    collective. `pipeline.train.preemption` handles the signals instead. The master port is derived from the job
    id (`master_port`) unless MASTER_PORT is set (the sbatch template sets it the same way).
    """
    if not SLURMEnvironment.detect():
        return None
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(master_port(job_id))
    return SLURMEnvironment(auto_requeue=False)


def master_port(job_id: str | int, base: int = 15000, span: int = 20000) -> int:
    """The rendezvous port of a Slurm job: `base + job_id % span`, so concurrent jobs on one node (consecutive ids)
    get different ports and a requeued job (same id) gets the same one."""
    digits = "".join(ch for ch in str(job_id).split("_")[0] if ch.isdigit())
    return base + (int(digits) if digits else 0) % span


def is_global_zero_from_env() -> bool:
    """Whether this process will be global rank 0, known before any process group exists: from torchrun's RANK,
    Slurm's SLURM_PROCID, or Lightning's own launcher (NODE_RANK, LOCAL_RANK); True outside any launcher."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"]) == 0
    if SLURMEnvironment.detect() and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("NODE_RANK", "0") or 0) == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
