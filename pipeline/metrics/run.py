"""What `ganpipe eval` runs: metrics of a run dir / checkpoint / export, and reference statistics (and the
classifier of acc and conf) ahead of time.

Job: resolve the generator, the dataset, the eval config (the run's own `eval:` section when the source is a
checkpoint, defaults for an export, then the command line's choices) and call the `Evaluator`. Under `torchrun`
(WORLD_SIZE > 1) it joins the process group itself (NCCL on GPUs, gloo on CPUs) and every rank extracts its
share; rank 0 prints and writes. The JSON record holds `details` when a metric has more to say than its numbers
(acc's classifier, ifid's per-class values, conf's per-class counts of confidently classified images).
Metrics that compare with no reals (is, the equivariance metrics eqtN_int, eqtN_frac, eqrN) need no dataset:
`ganpipe eval` runs them without --data, and `ganpipe eval stats` has nothing to cache for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data import ensure_synthetic_dataset, open_source
from pipeline.errors import ConfigError
from pipeline.metrics.classifier import dataset_classifier
from pipeline.metrics.config import EvalConfig
from pipeline.metrics.evaluate import Evaluator, load_generator_source
from pipeline.metrics.extractors import build_extractor
from pipeline.metrics.refs import class_reference_stats, reference_features
from pipeline.metrics.spec import parse_metric
from pipeline.storage import append_line, user_url


def default_cache_dir() -> str:
    return os.environ.get("GANPIPE_CACHE") or os.path.expanduser("~/.cache/ganpipe")


def init_distributed_from_env(device: str | None) -> torch.device:
    """Join torchrun's process group when there is one; the device this rank evaluates on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def _eval_config(base: dict[str, Any] | None, changes: dict[str, Any]) -> EvalConfig:
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    values = {k: v for k, v in (base or {}).items() if k in fields}
    values.update({k: v for k, v in changes.items() if v is not None})
    cfg = EvalConfig(**values)
    if cfg.best_metric not in cfg.metrics:
        cfg.best_metric = None  # the training-time choice does not constrain an evaluation after training
    cfg.validate("eval")
    return cfg


def evaluate_source(
    source: str,
    *,
    metrics: list[str] | None = None,
    data_url: str | None = None,
    changes: dict[str, Any] | None = None,
    device: str | None = None,
    jsonl: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of the generator at `source` (run dir, checkpoint or export folder); returns the JSON record."""
    for name in metrics or []:
        parse_metric(name)  # a typo fails before any loading
    dev = init_distributed_from_env(device)
    info = load_generator_source(source, dev)
    run_cfg = info.config
    changes = dict(changes or {})
    names = metrics or (run_cfg.get("eval", {}).get("metrics") if run_cfg else None) or ["fid50k_full"]
    cfg = _eval_config(run_cfg.get("eval") if run_cfg else None, {**changes, "metrics": list(names)})
    data = run_cfg.get("data", {}) if run_cfg else {}
    cache_dir = data.get("cache_dir") or default_cache_dir()
    if data_url is None and any(parse_metric(m).needs_reals for m in names):
        data_url = data.get("url")
        if data_url is None and data:  # trained on the built-in synthetic set: evaluate against the same set
            synth = data.get("synth", {})
            data_url = ensure_synthetic_dataset(
                cache_dir,
                n=synth.get("n", 2000),
                resolution=info.resolution,
                seed=synth.get("seed", 0),
                layout=synth.get("layout", "grid"),
            )
        if data_url is None:
            raise ConfigError(f"{source!r} does not say which data it was trained on: pass --data DATA_URL")
    rank = dist.get_rank() if dist.is_initialized() else 0
    evaluator = Evaluator(cfg, data_url, info.resolution, cache_dir, dev, progress=progress and rank == 0)
    with user_url("--data", data_url or "(none)"):
        results = evaluator.evaluate(info.sampler)
    record = {
        "source": source,
        "data": data_url,
        "kimg": info.kimg,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "num_ranks": dist.get_world_size() if dist.is_initialized() else 1,
        "extractor": evaluator.extractor_id,
        "results": results,
    }
    if evaluator.last_details:  # acc's classifier, ifid's per-class values, conf's per-class counts
        record["details"] = evaluator.last_details
    if jsonl and rank == 0:
        with user_url("--jsonl", jsonl):
            append_line(jsonl, json.dumps(record))
    return record


def build_stats(
    data_url: str,
    *,
    metrics: list[str],
    resolution: int | None = None,
    changes: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compute (or find) the cached reference statistics `metrics` will need for `data_url`: the reals' Gaussian
    (and features) for fid/kid/pr, each class's for ifid (`eval.classes`, empty = every class of the manifest) and
    the classifier for acc and conf (with its held-out reals' confident share and spread)."""
    dev = init_distributed_from_env(device)
    cfg = _eval_config(None, {**(changes or {}), "metrics": metrics})
    cache_dir = cache_dir or default_cache_dir()
    cache_url = cfg.cache_url or f"{cache_dir.rstrip('/')}/metrics"
    manifest = open_source(data_url).manifest
    if resolution is None:
        resolution = manifest.resolution if manifest is not None else None
    specs = [parse_metric(m) for m in metrics]
    extractor = build_extractor(cfg, cache_dir, dev) if any(s.needs_extractor for s in specs) else None
    done: list[dict[str, Any]] = []
    seen: set[tuple[int | None, bool]] = set()
    classifier_done = False
    for spec in sorted(specs, key=lambda s: not s.needs_real_features):
        if not spec.needs_reals:  # is and the equivariance metrics: nothing of the dataset to cache
            continue
        if spec.needs_classifier:
            if classifier_done:
                continue  # one classifier serves every acc and conf metric
            classifier_done = True
            clf, hit = dataset_classifier(data_url, cache_url=cache_url, resolution=resolution,
                                          batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=dev,
                                          who=spec.name)  # fmt: skip
            done.append({"metric": spec.name, "classifier": clf.classifier_id, "num_train": clf.num_train,
                         "heldout_accuracy": clf.heldout_accuracy,
                         "heldout_confident": clf.heldout_confidence.share,
                         "heldout_confident_spread": clf.heldout_confidence.spread, "cache_hit": hit})  # fmt: skip
            continue
        assert extractor is not None
        if spec.kind == "ifid":
            if manifest is not None and not manifest.has_labels:
                raise ConfigError(
                    f"{spec.name} needs class labels (.cls) but the dataset at {data_url!r} has none: write it "
                    "with `ganpipe data shards --layout classes`"
                )
            if cfg.classes:
                classes = list(cfg.classes)
            elif manifest is not None:
                classes = list(range(manifest.num_classes))
            else:
                raise ConfigError(f"{spec.name}: the shards at {data_url!r} have no manifest to count the classes: "
                                  "name them with --classes 0,1,2")  # fmt: skip
            stats, hit = class_reference_stats(
                data_url, extractor, classes, cache_url=cache_url, resolution=resolution, num_real=spec.num_real,
                batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=dev, progress=progress,
            )  # fmt: skip
            done.append({"metric": spec.name, "num_real": {str(k): s.num for k, s in stats.items()}, "cache_hit": hit,
                         "extractor": extractor.extractor_id})  # fmt: skip
            continue
        if any(n == spec.num_real and (f or not spec.needs_real_features) for n, f in seen):
            continue
        feats, hit = reference_features(
            data_url, extractor, cache_url=cache_url, resolution=resolution, num_real=spec.num_real,
            need_features=spec.needs_real_features, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            device=dev, progress=progress,
        )  # fmt: skip
        seen.add((spec.num_real, spec.needs_real_features))
        done.append({"metric": spec.name, "num_real": feats.num, "cache_hit": hit, "extractor": extractor.extractor_id})
    return done


__all__ = ["build_stats", "default_cache_dir", "evaluate_source", "init_distributed_from_env"]
