"""Two gloo processes with half the batch each end K steps where one process with the whole batch ends.

Both runs go through the real engine: `GANTask.training_step` under a Lightning Trainer built by
`pipeline.train.run.build_trainer` (GANStrategy for two ranks, the single-device strategy for one). Only what is
random per process is pinned, so that the two topologies see the same numbers:
    * latents: drawn for the global batch from a generator seeded by (step, phase); each rank takes its rows;
    * per-pixel noise in G's synthesis layers is switched off (it is drawn per rank);
    * style mixing and path length are off (they draw per rank); lazy R1 (double backward) is on.
Rows are dealt so that each minibatch-stddev group of the single process lies on one rank (strided rows without
gradient accumulation; contiguous rows with `train.batch_gpu` accumulation), as the groups are per forward pass.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import config_from_dict
from pipeline.objectives import Phase
from pipeline.train.distributed import leave_process_group
from pipeline.train.run import build_trainer
from pipeline.train.task import GANTask

STEPS = 4
SETTINGS = [
    "loss.r1_gamma=1",
    "loss.d_reg_interval=2",  # R1 on steps 0 and 2: lazy regularization with its lr/beta correction
    "loss.pl_weight=0",
    "loss.style_mixing_prob=0",
    "train.ema_kimg=0.01",
    "train.ema_rampup=null",
    "train.accelerator=cpu",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(rows: str, total: int, world: int, rank: int) -> slice:
    """This rank's rows of a global batch: every world-th row, or one contiguous block."""
    if rows == "strided":
        return slice(rank, total, world)
    per = total // world
    return slice(rank * per, (rank + 1) * per)


class PinnedTask(GANTask):
    """GANTask whose per-process randomness is replaced by the same numbers for any number of ranks."""

    def __init__(self, cfg: Any, rows: str) -> None:
        super().__init__(cfg)
        self.rows = rows
        for module in (*self.G.modules(), *self.G_ema.modules()):
            if hasattr(module, "use_noise"):
                module.use_noise = False

    def draw_latents(self, phase: Phase, n: int, real_c: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        gen = torch.Generator().manual_seed(1000 * self.step_idx + self.phases.index(phase))
        z = torch.randn([n * self.world_size, self.z_dim], generator=gen)
        return z[_rows(self.rows, len(z), self.world_size, self.global_rank)].to(self.device), None


def _batches(batch_size: int, resolution: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        {
            "image": torch.randint(0, 256, [batch_size, 3, resolution, resolution], generator=gen, dtype=torch.uint8),
            "label": torch.zeros([batch_size], dtype=torch.int64),
        }
        for _ in range(STEPS)
    ]


def _train(cfg_dict: dict[str, Any], rows: str) -> dict[str, dict[str, torch.Tensor]]:
    """K steps through the Trainer; this rank's rows of the global batches."""
    torch.set_num_threads(1)  # the same kernels in every process, so the same float rounding
    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(cfg.seed)
    task = PinnedTask(cfg, rows)
    trainer = build_trainer(cfg, callbacks=[])
    world = cfg.train.devices * cfg.train.num_nodes
    batches = _batches(cfg.data.batch_size, cfg.data.resolution)
    rank = int(os.environ.get("RANK", "0"))
    per_rank = [{k: v[_rows(rows, len(v), world, rank)] for k, v in b.items()} for b in batches]
    loader = torch.utils.data.DataLoader(per_rank, batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    assert task.step_idx == STEPS and task.cur_nimg == STEPS * cfg.data.batch_size
    return {
        "G": task.G.state_dict(),
        "D": task.D.state_dict(),
        "G_ema": task.G_ema.state_dict(),
        "objective": task.objective.state_dict(),
    }


def _worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], rows: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        del os.environ[var]  # a test runner inside a Slurm job must not make Lightning take Slurm's ranks
    state = _train(cfg_dict, rows)
    leave_process_group()
    torch.save(state, f"{out}-{rank}.pt")


def _assert_same(actual: dict, expected: dict, skip: tuple[str, ...] = (), atol: float = 1e-5) -> None:
    for net, tensors in expected.items():
        assert set(actual[net]) == set(tensors), net
        for key, value in tensors.items():
            if key in skip:
                continue
            torch.testing.assert_close(actual[net][key], value, rtol=0, atol=atol, msg=f"{net}.{key}")


@pytest.mark.parametrize(
    ("rows", "batch_gpu", "mbstd", "skip"),
    [
        # The whole batch in one pass: the single process's mbstd groups (rows i, i+2, ...) are the ranks' rows.
        ("strided", "null", 4, ()),
        # Accumulation in rounds of 2 on both sides. w_avg is a running mean updated per round, sequentially in one
        # process and in parallel on two, so only it may differ (it does not enter any loss).
        ("contiguous", 2, 2, ("mapping.w_avg",)),
    ],
    ids=["whole-batch", "batch_gpu-accumulation"],
)
def test_two_gloo_ranks_equal_one_process(make_config, tmp_path: Path, rows, batch_gpu, mbstd, skip) -> None:
    common = [*SETTINGS, f"train.batch_gpu={batch_gpu}", f"model.discriminator.mbstd_group_size={mbstd}"]
    single_cfg = make_config(*common, "train.devices=1")
    dist_cfg = make_config(*common, "train.devices=2", "train.backend=gloo")
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), dist_cfg.to_dict(), rows, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(2)]

    threads = torch.get_num_threads()
    try:
        single = _train(single_cfg.to_dict(), rows)
    finally:
        torch.set_num_threads(threads)

    _assert_same(ranks[1], ranks[0], atol=0)  # the ranks agree exactly, buffers included
    _assert_same(ranks[0], single, skip=skip)
    # Training moved the weights, so the comparison is not vacuous.
    torch.manual_seed(single_cfg.seed)
    initial = PinnedTask(single_cfg, rows).G.state_dict()["synthesis.b4.conv1.weight"]
    assert (single["G"]["synthesis.b4.conv1.weight"] - initial).abs().max() > 1e-4
