"""The training entry point: config -> dataset -> GANTask + Lightning Trainer -> checkpoints, samples, logs.

`train(cfg, resume=...)` is what `ganpipe train` calls. With `resume="auto"` it continues from the newest valid
checkpoint in the run dir (or starts fresh when there is none); with a path it continues from that checkpoint.
Training stops when `train.total_kimg` thousand images have been shown, so a resumed run can be extended by
raising `total_kimg`.

Several processes (`train.devices` x `train.num_nodes` ranks): every rank runs `train()`. Under `srun` the ranks
come from Slurm (Lightning's SLURMEnvironment, master port derived from the job id); elsewhere Lightning launches
the local processes itself (or joins torchrun's). Gradient sync is the strategy `train.strategy` selects
(`pipeline.train.strategy`; by default the per-phase all-reduce of `pipeline.train.distributed`).
Before the process group exists, only rank 0 writes (config.yaml, the wandb run id) and the synthetic dataset is
made under a file lock; checkpoints, sample grids and logs are written by rank 0 only. A pre-timeout signal or
SIGTERM stops training at the next step with a checkpoint (`pipeline.train.preemption`); after the pre-timeout
signal rank 0 requeues the Slurm job, which continues with `--resume auto`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import torch
from filelock import FileLock

from pipeline.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, resolve_checkpoint
from pipeline.config import Config, to_yaml
from pipeline.data import StreamLoader, StreamOptions, build_train_stream, ensure_synthetic_dataset, read_manifest
from pipeline.errors import ConfigError
from pipeline.families import get_family
from pipeline.ops._dispatch import ENV_VAR as OPS_ENV_VAR
from pipeline.storage import user_url
from pipeline.train.callbacks import KimgCheckpoint, SampleGrid
from pipeline.train.console import ConsoleTicks, on_terminal
from pipeline.train.distributed import is_global_zero_from_env, leave_process_group, slurm_environment
from pipeline.train.eval_callback import EvalCallback
from pipeline.train.lock import RunLock
from pipeline.train.loggers import build_loggers, finish_wandb
from pipeline.train.preemption import PreemptionCallback, requeue_if_requested
from pipeline.train.strategy import GradientSync, build_sync
from pipeline.train.task import GANTask
from pipeline.train.transfer import init_networks

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    checkpoint: str | None
    kimg: float
    preempted: bool = False  # stopped early by Ctrl-C, SIGTERM or the pre-timeout signal (with a checkpoint)
    requeued: bool = False  # ... and the Slurm job was requeued to continue
    stopped_by: str | None = None  # the signal that stopped it early (or cut its final evaluation short), in words
    exit_code: int = 0  # for `ganpipe train`: 0 done or requeued, else 128 + the stopping signal's number


def dataset_url(cfg: Config) -> str:
    """The configured shard URL, or the built-in synthetic dataset (created in the cache on first use)."""
    d = cfg.data
    if d.url:
        return d.url
    cache = d.resolved_cache_dir()
    Path(cache).mkdir(parents=True, exist_ok=True)
    # Every rank of a job gets here at once; one writes the dataset while the others wait, then reuse it.
    with FileLock(os.path.join(cache, ".synthetic.lock")):
        return ensure_synthetic_dataset(
            cache, n=d.synth.n, resolution=d.resolution, seed=d.synth.seed, layout=d.synth.layout
        )


def check_dataset_fits(cfg: Config, url: str) -> None:
    """The dataset's resolution, and what the family's conditioning needs of it (labels, captions), before any
    work starts."""
    manifest = read_manifest(url)
    if manifest.resolution != cfg.data.resolution:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution} but the dataset at {url!r} is {manifest.resolution}px: "
            f"set data.resolution={manifest.resolution} or re-shard the data"
        )
    family = get_family(cfg.family)
    family.build_conditioning(family.spec(cfg.model, cfg.data.resolution, cfg)).check_dataset(manifest, url)


class ShardDataModule(L.LightningDataModule):
    """Streams each rank its batches of the shards (`pipeline.data.stream`), continuing exactly where the
    checkpoint's `data` entry left the stream (same ranks and workers), or from a fresh, logged seed otherwise.

    The loader holds exactly the batches needed to reach `train.total_kimg`, so Lightning runs one epoch. It
    hands the task a `StreamMonitor` that follows the stream's position and bad-data counters through the
    batches the trainer actually consumed (prefetched batches do not count).
    """

    def __init__(self, cfg: Config, url: str, start_nimg: int) -> None:
        super().__init__()
        self.cfg, self.url, self.start_nimg = cfg, url, start_nimg

    def train_dataloader(self) -> StreamLoader:
        d, world = self.cfg.data, self.trainer.world_size
        if d.batch_size % world != 0:
            raise ConfigError(
                f"data.batch_size={d.batch_size} is not divisible by the {world} ranks: make it a multiple"
            )
        batch_per_rank = d.batch_size // world
        steps = math.ceil(max(self.cfg.train.total_nimg - self.start_nimg, 0) / d.batch_size)
        task = self.trainer.lightning_module
        loader, monitor = build_train_stream(
            self.url,
            batch_size=batch_per_rank,
            seed=self.cfg.seed,
            resolution=d.resolution,
            num_batches=steps,
            steps_done=self.start_nimg // d.batch_size,
            cur_nimg=self.start_nimg,
            saved=getattr(task, "resume_data_state", None),
            xflip=d.xflip,
            rank=self.trainer.global_rank,
            world_size=world,
            num_workers=d.num_workers,
            options=StreamOptions.from_config(d),
            transform=task.conditioning.batch_transform(),  # e.g. captions -> token ids, in the data workers
        )
        task.data_monitor = monitor
        return loader


def _load_resume_state(cfg: Config, resume: str | None) -> tuple[str | None, dict[str, Any] | None]:
    if resume is None:
        if list_checkpoints(cfg.run_dir):
            raise ConfigError(
                f"run dir {cfg.run_dir!r} already has checkpoints: pass --resume auto to continue it, "
                "or choose another run_dir=..."
            )
        return None, None
    if resume == "auto":
        found = find_latest_checkpoint(cfg.run_dir)
        if found is None:
            log.info("no checkpoint in %s: starting a new run", cfg.run_dir)
            return None, None
        return found
    with user_url("--resume", resume):
        url = resolve_checkpoint(resume)
        return url, load_checkpoint(url)


def _check_compatible(cfg: Config, state: dict[str, Any], url: str) -> None:
    saved = state.get("config", {})
    for key in ("family", "model"):
        if saved.get(key) != cfg.to_dict()[key]:
            raise ConfigError(
                f"checkpoint {url!r} was trained with a different {key!r}: resume with the recipe it was trained with"
            )
    if saved.get("data", {}).get("resolution") != cfg.data.resolution:
        raise ConfigError(f"checkpoint {url!r} was trained at another data.resolution: use the same resolution")


def warn_cpu_ranks(cfg: Config) -> bool:
    """Several ranks on CPUs share one machine's cores: say so (it tests multi-rank training, it is not faster)."""
    t = cfg.train
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if t.devices > 1 and on_cpu:
        log.warning(
            "train.devices=%d on CPU: %d processes share this machine's %d cores, which tests multi-rank training "
            "but does not make it faster; use train.devices=1 for speed",
            t.devices, t.devices, os.cpu_count() or 1,
        )  # fmt: skip
        return True
    return False


def build_trainer(cfg: Config, callbacks: list[L.Callback], sync: GradientSync | None = None) -> L.Trainer:
    """Lightning's Trainer for `cfg`: processes from the gradient-sync strategy (`sync`, default `train.strategy`'s),
    our own checkpoints and loggers, one epoch over the finite stream."""
    t = cfg.train
    steps_per_log = max(1, round(t.log_every_kimg * 1000 / cfg.data.batch_size))
    sync = sync or build_sync(cfg)
    plugins: list[Any] = sync.trainer_plugins()
    env = slurm_environment()
    if env is not None:
        plugins.append(env)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=sync.trainer_strategy(),
        plugins=plugins or None,
        precision=t.precision,
        max_epochs=1,  # one pass over a finite stream sized to reach total_kimg
        logger=build_loggers(cfg) or False,
        callbacks=callbacks,
        enable_checkpointing=False,  # checkpoints are ours: atomic, kimg-based, weights_only-loadable
        enable_progress_bar=cfg.train.progress_bar and on_terminal(),  # elsewhere: tick lines (ConsoleTicks)
        enable_model_summary=False,  # its table went to stdout on every start; the size line is ours (`_train`)
        log_every_n_steps=steps_per_log,
        use_distributed_sampler=False,  # the sampler already splits the stream across ranks
        num_sanity_val_steps=0,
        default_root_dir=cfg.run_dir,
    )


def train(cfg: Config, resume: str | None = None) -> TrainResult:
    """Train `cfg` to `cfg.train.total_kimg`; see the module docstring for `resume`. A storage failure (no
    credentials, no such bucket, ...) is one `StorageError` line naming the URL it concerns."""
    with _ops_impl(cfg.ops.impl), user_url("run_dir", cfg.run_dir):
        return _train(cfg, resume)


@contextlib.contextmanager
def _ops_impl(impl: str) -> Iterator[None]:
    """`ops.impl` as GANPIPE_OPS_IMPL (read by every op, inherited by data loader workers) while training runs;
    the caller's value is restored afterwards. 'auto' leaves the environment alone."""
    previous = os.environ.get(OPS_ENV_VAR)
    if impl != "auto":
        os.environ[OPS_ENV_VAR] = impl
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(OPS_ENV_VAR, None)
        else:
            os.environ[OPS_ENV_VAR] = previous


def _train(cfg: Config, resume: str | None) -> TrainResult:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with user_url("data.url", cfg.data.url or cfg.data.resolved_cache_dir()):
        url = dataset_url(cfg)
        check_dataset_fits(cfg, url)
    if is_global_zero_from_env():
        warn_cpu_ranks(cfg)
    # One writer per run dir: rank 0 holds its lease from here (before it writes anything) until training stops.
    lock = RunLock(cfg.run_dir) if is_global_zero_from_env() else None
    if lock is not None:
        lock.acquire()
    try:
        return _train_holding_the_run_dir(cfg, resume, url, lock)
    finally:
        if lock is not None:
            lock.release()


def _train_holding_the_run_dir(cfg: Config, resume: str | None, url: str, lock: RunLock | None) -> TrainResult:
    ckpt_url, state = _load_resume_state(cfg, resume)

    if is_global_zero_from_env():
        fs, run_path = fsspec.core.url_to_fs(cfg.run_dir)
        fs.makedirs(run_path, exist_ok=True)
        fs.pipe_file(f"{run_path}/config.yaml", to_yaml(cfg).encode())

    task = GANTask(cfg)
    if is_global_zero_from_env():
        sizes = {name: sum(p.numel() for p in net.parameters()) for name, net in task.named_children()}
        log.info(
            "%s networks: %s parameters", cfg.family, ", ".join(f"{k} {n / 1e6:.2f}M" for k, n in sizes.items() if n)
        )
    if state is not None:
        assert ckpt_url is not None
        _check_compatible(cfg, state, ckpt_url)
        task.load_training_state(state)
        log.info("resuming from %s at %.1f kimg", ckpt_url, task.cur_nimg / 1000)
    elif cfg.init:
        with user_url("init", cfg.init):
            init_networks(cfg.init, cfg.family, cfg.to_dict()["model"], cfg.data.resolution, task.G, task.G_ema, task.D)

    if task.cur_nimg >= cfg.train.total_nimg:
        log.info(
            "run already at %.1f kimg >= train.total_kimg=%s: nothing to do", task.cur_nimg / 1000, cfg.train.total_kimg
        )
        return TrainResult(run_dir=cfg.run_dir, checkpoint=ckpt_url, kimg=task.cur_nimg / 1000)

    t = cfg.train
    checkpointer = KimgCheckpoint(cfg.run_dir, t.checkpoint_every_kimg, t.keep_last)
    preemption = PreemptionCallback(checkpointer.save_once, t.requeue_signal, lock.lost_reason if lock else None)
    stop = preemption.requested  # long work between steps gives up when a stop signal arrives
    callbacks: list[L.Callback] = [
        checkpointer,
        SampleGrid(cfg.run_dir, t.samples_every_kimg, t.grid_rows, t.grid_cols, seed=cfg.seed, should_stop=stop),
    ]
    if cfg.eval.metrics:
        callbacks.append(EvalCallback(cfg, url, should_stop=stop))
    if not (t.progress_bar and on_terminal()):
        callbacks.append(ConsoleTicks(t.log_every_kimg))
    callbacks.append(preemption)  # last: a checkpoint already due at this step is not written twice
    trainer = build_trainer(cfg, callbacks, task.sync)
    # Ctrl-C and SIGTERM from here on checkpoint and stop, until this attempt is over (its teardown included);
    # handlers are never left behind in the caller's process.
    preemption.install()
    try:
        try:
            trainer.fit(task, datamodule=ShardDataModule(cfg, url, task.cur_nimg))
        finally:
            finish_wandb(trainer.loggers)
        requeued = requeue_if_requested(preemption, trainer.is_global_zero)
        leave_process_group()
    finally:
        preemption.uninstall()
    return TrainResult(
        run_dir=cfg.run_dir,
        checkpoint=checkpointer.last_written or ckpt_url,
        kimg=task.cur_nimg / 1000,
        preempted=task.preempted,
        requeued=requeued,
        stopped_by=preemption.signal_name,
        exit_code=preemption.exit_code(requeued),
    )
