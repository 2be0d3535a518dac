"""The evaluation callback: metrics of G_ema every `eval.every_kimg` and at the end of training.

Job: when kimg crosses a multiple of `eval.every_kimg` (and once at the end, unless that point was just
evaluated), every rank evaluates G_ema together (`pipeline.metrics.Evaluator`: each rank extracts its share
of features; all ranks get the same numbers). Rank 0 then
    - logs them to every logger as `metrics/<name>` at the current step,
    - appends one JSON line to RUN_DIR/metrics.jsonl:
      {"kimg": 5.0, "cur_nimg": 5024, "step": 157, "timestamp": "...Z", "seconds": 2.1, "num_ranks": 1,
       "extractor": "small-seed0", "results": {"fid2k_full": 41.3, "kid2k_full": 0.031, "kid2k_full_std": ...}}
    - with `eval.best_metric`, writes checkpoints/best-<metric>.pt (a full training checkpoint, written atomically
      by `save_checkpoint`; its name does not match `ckpt-*.pt`, so pruning and `--resume auto` ignore it) and
      best-<metric>.json ({"metric", "value", "kimg", "checkpoint"}) whenever the metric improves. The JSON is
      read back at start, so a resumed run only replaces the best checkpoint with a better one.

Evaluation runs inside `torch.random.fork_rng` and draws latents from private generators, so it never moves the
training RNG: a run with evaluation trains exactly like one without. A stop signal (Ctrl-C, SIGTERM, the
pre-timeout signal: `should_stop`) abandons an evaluation between batches: nothing is logged or appended for it,
and the step boundary right after checkpoints and stops.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

import fsspec
import lightning as L
import torch

from pipeline.checkpoint import checkpoint_dir, save_checkpoint
from pipeline.config import Config
from pipeline.metrics import Evaluator, better
from pipeline.metrics.features import Abandoned, StopCheck
from pipeline.storage import append_line, publish_atomic
from pipeline.train.callbacks import crossed
from pipeline.train.task import GANTask

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    """See the module docstring. `data_url`: the resolved dataset (the synthetic set's folder if data.url is null)."""

    def __init__(self, cfg: Config, data_url: str, should_stop: StopCheck | None = None) -> None:
        self.cfg, self.data_url, self.should_stop = cfg, data_url, should_stop
        self.run_dir = cfg.run_dir.rstrip("/")
        self.metrics_url = f"{self.run_dir}/metrics.jsonl"
        self.evaluator: Evaluator | None = None
        self.best: float | None = None
        self._prev_nimg = 0
        self._evaluated_nimg = -1

    @property
    def best_json_url(self) -> str:
        return f"{checkpoint_dir(self.run_dir)}/best-{self.cfg.eval.best_metric}.json"

    def on_train_start(self, trainer: L.Trainer, task: GANTask) -> None:
        self._prev_nimg = task.cur_nimg
        if self.cfg.eval.best_metric:
            fs, path = fsspec.core.url_to_fs(self.best_json_url)
            if fs.exists(path):
                self.best = float(json.loads(fs.cat_file(path))["value"])

    def on_train_batch_end(self, trainer: L.Trainer, task: GANTask, *args: Any) -> None:
        if crossed(self._prev_nimg, task.cur_nimg, self.cfg.eval.every_kimg):
            self.run(trainer, task)
        self._prev_nimg = task.cur_nimg

    def on_train_end(self, trainer: L.Trainer, task: GANTask) -> None:
        # After a preemption stop the job has seconds before Slurm kills it: the resumed run evaluates later.
        if self._evaluated_nimg != task.cur_nimg and not task.preempted:
            self.run(trainer, task)

    def run(self, trainer: L.Trainer, task: GANTask) -> dict[str, float]:
        """Evaluate G_ema now (every rank), then log, append and keep the best (rank 0 writes)."""
        self._evaluated_nimg = task.cur_nimg
        if self.evaluator is None:
            d = self.cfg.data
            self.evaluator = Evaluator(self.cfg.eval, self.data_url, d.resolution, d.resolved_cache_dir(), task.device)
        t0 = time.perf_counter()
        kimg = task.cur_nimg / 1000
        if trainer.is_global_zero:
            log.info("evaluating %s at %.1f kimg", ", ".join(self.cfg.eval.metrics), kimg)
        devices = [task.device] if task.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                results = self.evaluator.evaluate(task.sampler(), self.should_stop)
        except Abandoned:
            if trainer.is_global_zero:
                log.info("evaluation at %.1f kimg abandoned after %.1fs: stopping", kimg, time.perf_counter() - t0)
            return {}
        seconds = time.perf_counter() - t0
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"metrics/{k}": v for k, v in results.items()}, step=task.log_step)
                logger.save()
            record = {
                "kimg": kimg,
                "cur_nimg": task.cur_nimg,
                "step": task.log_step,
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "seconds": round(seconds, 3),
                "num_ranks": trainer.world_size,
                "extractor": self.evaluator.extractor_id,
                "results": results,
            }
            append_line(self.metrics_url, json.dumps(record))
            log.info("kimg %.1f: %s", kimg, "  ".join(f"{k} {v:.4g}" for k, v in results.items()))
        name = self.cfg.eval.best_metric
        if name and better(name, results[name], self.best):  # identical on every rank: all take the branch
            self.best = results[name]
            state = task.training_state()  # every rank: collectives inside must not deadlock
            if trainer.is_global_zero:
                url = f"{checkpoint_dir(self.run_dir)}/best-{name}.pt"
                save_checkpoint(state, url)
                info = {"metric": name, "value": self.best, "kimg": kimg, "checkpoint": url}
                publish_atomic(self.best_json_url, json.dumps(info, indent=1).encode())
                log.info("new best %s %.4g at %.1f kimg: %s", name, self.best, kimg, url)
            trainer.strategy.barrier("best-checkpoint")
        return results


__all__ = ["EvalCallback"]
