"""Where training's numbers and sample grids go: an append-only CSV (`RUN_DIR/logs/metrics.csv`), TensorBoard
(`RUN_DIR/logs/tensorboard`) and Weights & Biases, each continuing across resumes and Slurm requeues.

Contract
    * Nothing a run logged is lost when it resumes. The CSV is appended to, never truncated (Lightning's own
      CSVLogger deletes it on resume). An attempt that logs a column the file lacks (a metric switched on at
      resume) rewrites the file once, atomically, with the union of the columns: earlier rows keep their values and
      are blank in the new columns. TensorBoard adds an event file per attempt to the same folder; wandb continues
      the run whose id is stored in `RUN_DIR/wandb_run_id.txt`.
    * The x-axes continue: `step` is the engine's step count (restored on resume, see `GANTask.on_train_start`),
      `kimg` the images shown.
    * Sample grids go, besides their PNG files, to the loggers that take images (TensorBoard, wandb).
    * Only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

import fsspec
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from pipeline.config import Config
from pipeline.storage import append_text, publish_atomic
from pipeline.train.distributed import is_global_zero_from_env

DROPPED = ("epoch",)  # Lightning adds it to every row; one stream of data has one epoch


def _text(value: Any) -> str:
    """The shortest text that reads back as the value: float32 precision for what Lightning logged as float32
    (0.008, not 0.00800000037997961), full precision for the rest (an evaluation's FID)."""
    x = float(value)
    single = np.float32(x)
    return str(single) if float(single) == x else repr(x)


def _read_header(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The columns of the CSV at `path` (its first line); none when there is no file yet."""
    try:
        with fs.open(path, "r") as fh:
            return next(csv.reader([fh.readline()]), [])
    except FileNotFoundError:
        return []


class AppendingCSVLogger(Logger):
    """`RUN_DIR/logs/metrics.csv`, one row per logged step, kept across attempts (see the module docstring)."""

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.run_dir = run_dir.rstrip("/")
        self.url = f"{self.run_dir}/logs/metrics.csv"
        self._rows: list[dict[str, Any]] = []
        self._header: list[str] | None = None  # the file's columns, once read

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return f"{self.run_dir}/logs"

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row: dict[str, Any] = {"step": step}
        row.update({k: _text(v) for k, v in metrics.items() if k not in DROPPED})
        self._rows.append(row)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The run's configuration is `RUN_DIR/config.yaml`; nothing to add here."""

    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        fs, path = fsspec.core.url_to_fs(self.url)
        if self._header is None:  # read once per attempt; afterwards this logger is the file's only writer
            self._header = _read_header(fs, path)
        columns = list(self._header)
        for row in self._rows:
            columns.extend(k for k in row if k not in columns)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        if columns != self._header:  # new columns (or a new file): the whole file again, every earlier row kept
            writer.writeheader()
            if self._header:
                writer.writerows(csv.DictReader(io.StringIO(fs.cat_file(path).decode())))
            writer.writerows(self._rows)
            publish_atomic(path, out.getvalue().encode(), fs=fs)
        else:
            writer.writerows(self._rows)
            append_text(self.url, out.getvalue())
        self._header, self._rows = columns, []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def build_loggers(cfg: Config) -> list[Logger]:
    """The loggers `cfg.logger` asks for."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(AppendingCSVLogger(cfg.run_dir))
    if cfg.logger.tensorboard:
        loggers.append(
            TensorBoardLogger(save_dir=cfg.run_dir, name="logs", version="tensorboard", default_hp_metric=False)
        )
    w = cfg.logger.wandb
    if w.project:
        # Only rank 0 logs to wandb; the others must not race it to create the id file.
        run_id = wandb_run_id(cfg.run_dir) if is_global_zero_from_env() else None
        loggers.append(
            WandbLogger(
                project=w.project, entity=w.entity, name=w.name, save_dir=cfg.run_dir, id=run_id, resume="allow"
            )
        )
    return loggers


def wandb_run_id(run_dir: str) -> str:
    """One wandb run per run dir: the id is stored beside the checkpoints so a resumed job continues it."""
    url = f"{run_dir.rstrip('/')}/wandb_run_id.txt"
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        return fs.cat_file(path).decode().strip()
    run_id = uuid.uuid4().hex[:12]  # wandb takes any letters and digits (its own id helper moved between versions)
    publish_atomic(path, run_id.encode(), fs=fs)
    return run_id


def finish_wandb(loggers: list[Logger]) -> None:
    """End this attempt's wandb run (Lightning leaves it open): a later `train()` in the same process, e.g. a resume,
    then starts its own attempt of the run instead of writing into this one."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:  # never create a run just to end it
            logger.experiment.finish()


@rank_zero_only
def log_image(loggers: list[Logger], tag: str, image: np.ndarray, step: int) -> None:
    """An [H, W, C] uint8 image (a sample grid) to every logger that takes images."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=step)


__all__ = ["AppendingCSVLogger", "build_loggers", "finish_wandb", "log_image", "wandb_run_id"]
