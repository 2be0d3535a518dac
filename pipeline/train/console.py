"""What a training prints: a progress bar on a terminal, one tick line per `train.log_every_kimg` elsewhere (a Slurm
`.out` file, `nohup`, a pipe), our own log lines, and none of Lightning's chatter.

    tick kimg 12.000  img/s 102.3  s/kimg 9.78  G 1.234  D 0.987  peak_mem 1.21 GB  bad 0.00%

Tick lines are what NVIDIA's training prints; they carry the kimg, the throughput since the previous tick, the last
logged G and D losses, the peak accelerator (or process) memory and the share of bad data samples. Lightning's INFO
lines (printed twice through its own handler and ours), its hardware and advertisement notices and its warnings
about things ganpipe does on purpose are silenced; ganpipe's own messages and every other warning stay.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning as L

from pipeline.train.callbacks import crossed
from pipeline.train.task import peak_memory_gb

# Lightning warnings about what ganpipe does deliberately (one stream of data per run, G_ema in eval mode, its own
# Slurm handling and checkpoints); each is a regular expression on the message.
LIGHTNING_NOTICES = (
    r"The `srun` command is available on your system but is not used",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"torch.distributed.nn.functional.all_gather is deprecated",
)


def quiet_lightning() -> None:
    """Silence Lightning's INFO lines and notices (see the module docstring); our loggers are untouched."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in LIGHTNING_NOTICES:
        warnings.filterwarnings("ignore", message=message)


def on_terminal() -> bool:
    """Whether a person is watching: a progress bar draws on stderr, tick lines go to stdout otherwise."""
    return sys.stderr.isatty() and sys.stdout.isatty()


class ConsoleTicks(L.Callback):
    """One line per `every_kimg` to stdout (rank 0), for logs that no progress bar can draw in."""

    def __init__(self, every_kimg: float) -> None:
        self.every_kimg = every_kimg
        self._prev_nimg = 0
        self._tick_nimg = 0
        self._tick_time = 0.0

    def on_train_start(self, trainer: L.Trainer, task: Any) -> None:
        self._prev_nimg = self._tick_nimg = task.cur_nimg
        self._tick_time = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, task: Any, *args: Any) -> None:
        if crossed(self._prev_nimg, task.cur_nimg, self.every_kimg) and trainer.is_global_zero:
            print(self.line(trainer, task), flush=True)
        self._prev_nimg = task.cur_nimg

    def line(self, trainer: L.Trainer, task: Any) -> str:
        now = time.perf_counter()
        images, seconds = task.cur_nimg - self._tick_nimg, now - self._tick_time
        self._tick_nimg, self._tick_time = task.cur_nimg, now
        parts = [f"tick kimg {task.cur_nimg / 1000:.3f}"]
        if images > 0 and seconds > 0:
            parts.append(f"img/s {images / seconds:.1f}  s/kimg {seconds / (images / 1000):.2f}")
        metrics = trainer.callback_metrics
        for short, name in (("G", "Loss/G/loss"), ("D", "Loss/D/loss")):
            if name in metrics:
                parts.append(f"{short} {float(metrics[name]):.3f}")
        parts.append(f"peak_mem {peak_memory_gb(task.device):.2f} GB")
        if "Data/bad_fraction" in metrics:
            parts.append(f"bad {100 * float(metrics['Data/bad_fraction']):.2f}%")
        return "  ".join(parts)


__all__ = ["LIGHTNING_NOTICES", "ConsoleTicks", "on_terminal", "quiet_lightning"]
