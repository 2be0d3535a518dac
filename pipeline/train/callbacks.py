"""Callbacks driven by images shown (kimg), not steps: periodic checkpoints and sample grids. Rank 0 writes.

Every rank runs every hook (the checkpoint's state is gathered with collectives), and only rank 0 touches the
run dir. After a preemption stop (`task.preempted`), end-of-training extras (the last sample grid) are skipped so
the job leaves before Slurm's kill.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from pipeline.checkpoint import (
    checkpoint_dir,
    checkpoint_name,
    clean_stale_temporaries,
    prune_checkpoints,
    save_checkpoint,
)
from pipeline.imaging import save_image_grid
from pipeline.metrics.features import StopCheck
from pipeline.models.conditioning import index_c
from pipeline.train.loggers import log_image
from pipeline.train.task import GANTask

log = logging.getLogger(__name__)


def crossed(prev_nimg: int, cur_nimg: int, every_kimg: float) -> bool:
    """True when a multiple of `every_kimg` thousand images lies in (prev_nimg, cur_nimg]."""
    every = max(round(every_kimg * 1000), 1)
    return cur_nimg // every > prev_nimg // every


class KimgCheckpoint(L.Callback):
    """A checkpoint every `every_kimg` and at the end of training; keeps the newest `keep_last`."""

    def __init__(self, run_dir: str, every_kimg: float, keep_last: int) -> None:
        self.run_dir, self.every_kimg, self.keep_last = run_dir, every_kimg, keep_last
        self._prev_nimg = 0
        self._saved_nimg = -1
        self.last_written: str | None = None  # the URL of the newest checkpoint this run wrote

    def on_train_start(self, trainer: L.Trainer, task: GANTask) -> None:
        self._prev_nimg = self._saved_nimg = task.cur_nimg
        if trainer.is_global_zero:
            # Leftovers of writes killed in an earlier job; no other writer runs now (rank 0 is the only one).
            clean_stale_temporaries(self.run_dir)

    def on_train_batch_end(self, trainer: L.Trainer, task: GANTask, *args: Any) -> None:
        if crossed(self._prev_nimg, task.cur_nimg, self.every_kimg):
            self.save(trainer, task)
        self._prev_nimg = task.cur_nimg

    def on_train_end(self, trainer: L.Trainer, task: GANTask) -> None:
        self.save_once(trainer, task)

    def save_once(self, trainer: L.Trainer, task: GANTask) -> None:
        """Save unless a checkpoint at this image count exists already (same answer on every rank)."""
        if self._saved_nimg != task.cur_nimg:
            self.save(trainer, task)

    def save(self, trainer: L.Trainer, task: GANTask) -> None:
        state = task.training_state()  # every rank: collectives inside must not deadlock
        url = f"{checkpoint_dir(self.run_dir)}/{checkpoint_name(task.cur_nimg)}"
        if trainer.is_global_zero:
            save_checkpoint(state, url)
            prune_checkpoints(self.run_dir, self.keep_last)
            log.info("saved checkpoint %s (%.1f kimg)", url, task.cur_nimg / 1000)
        self._saved_nimg = task.cur_nimg
        self.last_written = url
        trainer.strategy.barrier("checkpoint")


class SampleGrid(L.Callback):
    """Grids of G_ema samples from fixed latents (`samples/fakesNNNNNN.png`, kimg in the name) plus the reals.

    Drawn by the family's sampler, with the conditioning's grid (classes in turn, or the recipe's prompts). A grid
    being drawn when a stop signal arrives (`should_stop`) is skipped, so the stop is not delayed by it."""

    def __init__(
        self, run_dir: str, every_kimg: float, rows: int, cols: int, seed: int, should_stop: StopCheck | None = None
    ) -> None:
        self.samples_dir = f"{run_dir.rstrip('/')}/samples"
        self.every_kimg, self.rows, self.cols, self.seed = every_kimg, rows, cols, seed
        self.should_stop = should_stop
        self._prev_nimg = 0
        self._written_nimg = -1
        self._wrote_reals = False

    def on_train_start(self, trainer: L.Trainer, task: GANTask) -> None:
        self._prev_nimg = task.cur_nimg
        if task.cur_nimg == 0:
            self.write_fakes(trainer, task)

    def on_train_batch_end(self, trainer: L.Trainer, task: GANTask, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._wrote_reals and trainer.is_global_zero:
            n = min(self.rows * self.cols, batch["image"].shape[0])
            grid = save_image_grid(
                batch["image"][:n].float() / 127.5 - 1, f"{self.samples_dir}/reals.png", self._grid(n)
            )
            log_image(trainer.loggers, "samples/reals", grid, task.log_step)
            self._wrote_reals = True
        if crossed(self._prev_nimg, task.cur_nimg, self.every_kimg):
            self.write_fakes(trainer, task)
        self._prev_nimg = task.cur_nimg

    def on_train_end(self, trainer: L.Trainer, task: GANTask) -> None:
        if self._written_nimg != task.cur_nimg and not task.preempted:
            self.write_fakes(trainer, task)

    def _grid(self, n: int) -> tuple[int, int]:
        cols = min(self.cols, n)
        return (n + cols - 1) // cols, cols

    @torch.no_grad()
    def write_fakes(self, trainer: L.Trainer, task: GANTask) -> None:
        self._written_nimg = task.cur_nimg
        if not trainer.is_global_zero:
            return
        n = self.rows * self.cols
        sampler = task.sampler()
        # A private generator: sampling must not move the training RNG, or resume would not be exact.
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn([n, sampler.z_dim], generator=gen).to(task.device)
        c = sampler.conditioning.grid(n, task.device)
        chunks = []
        for i in range(0, n, 16):
            if self.should_stop is not None and self.should_stop():
                log.info("sample grid at %.1f kimg skipped: stopping", task.cur_nimg / 1000)
                return
            chunks.append(sampler.synthesize(z[i : i + 16], index_c(c, slice(i, i + 16))).cpu())
        images = torch.cat(chunks)
        url = f"{self.samples_dir}/fakes{task.cur_nimg // 1000:06d}.png"
        grid = save_image_grid(images, url, (self.rows, self.cols))
        log_image(trainer.loggers, "samples/fakes", grid, task.log_step)
        log.info("wrote sample grid %s", url)
