"""Evaluate a generator: metric names in, numbers out; used by the training callback and `ganpipe eval`.

Job: `Evaluator(cfg, data_url, resolution, cache_dir).evaluate(sampler)` computes `cfg.metrics`
(`pipeline.metrics.spec`) for the generator behind a family's sampler (`pipeline.models.sampling`) with one pass
of generated images (as many as the largest metric needs; metric m uses images 0..n_m-1) and one reference entry
per distinct real count. It keeps the extractor and the reference features between calls, so evaluating every
few kimg only pays for the generated images. `load_generator_source(path)` gives G_ema's sampler from anything
`pipeline.export.open_networks` reads (an export folder, a checkpoint, a run dir, a convertible file).

Result keys (what is logged and written to metrics.jsonl)
    fidN[_full]            FID
    kidN[_full], _std      KID mean over subsets (x1, not x1000) and its std
    isN, _std              Inception Score mean over 10 splits and its std
    prNk[_full]_precision, _recall
    clip_scoreN            CLIP score (needs a text-conditional generator)
All ranks of a distributed job must call `evaluate` together; every rank returns the same numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.export import open_networks
from pipeline.metrics.config import EvalConfig
from pipeline.metrics.extractors import FeatureExtractor, build_extractor
from pipeline.metrics.features import Features, StopCheck, generated_features
from pipeline.metrics.math import GaussianStats, fid_from_stats, inception_score, kid, precision_recall
from pipeline.metrics.refs import reference_features
from pipeline.metrics.spec import MetricSpec, parse_metric
from pipeline.models.sampling import Sampler
from pipeline.storage import user_url

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"fid": True, "kid": True, "is": False, "clip_score": False}


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` improves on `old` for `metric` (FID/KID lower, IS/CLIP higher)."""
    if old is None:
        return new == new  # NaN never counts as best
    return new < old if LOWER_IS_BETTER[parse_metric(metric).kind] else new > old


@dataclass
class GeneratorInfo:
    """A loaded generator (behind its family's sampler) and what evaluation needs to know about it."""

    sampler: Sampler
    resolution: int
    kimg: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the training config, when the source has one


def load_generator_source(source: str, device: str | torch.device = "cpu") -> GeneratorInfo:
    """G_ema (as its family's sampler) from an export folder, a checkpoint, a run dir or a convertible file."""
    with user_url("source", source):
        nets = open_networks(source)
    return GeneratorInfo(nets.sampler(device), nets.resolution, nets.kimg, nets.config or {})


class Evaluator:
    """Computes a list of metrics for generators of one dataset (see the module docstring)."""

    def __init__(
        self,
        cfg: EvalConfig,
        data_url: str | None,
        resolution: int,
        cache_dir: str,
        device: str | torch.device = "cpu",
        metrics: list[str] | None = None,
        progress: bool = False,
    ) -> None:
        self.cfg, self.data_url, self.resolution, self.cache_dir = cfg, data_url, resolution, cache_dir
        self.device, self.progress = torch.device(device), progress
        self.specs = [parse_metric(m) for m in (cfg.metrics if metrics is None else metrics)]
        if not self.specs:
            raise ConfigError("no metrics to compute: set eval.metrics=[fid50k_full] or pass --metrics fid50k_full")
        if any(s.needs_reals for s in self.specs) and not data_url:
            raise ConfigError("FID, KID and PR compare with real images: pass --data DATA_URL (a shard folder)")
        if any(s.kind == "clip_score" for s in self.specs):
            raise ConfigError(
                "clip_score is not computed by evaluation in this release (it needs the text-to-image family's "
                "captions protocol): remove it from the metrics; pipeline.metrics.clip scores images against "
                "captions directly"
            )
        if cfg.extractor == "small" and any(s.kind == "is" for s in self.specs):
            raise ConfigError("Inception Score needs class logits: set eval.extractor=inception")
        self.cache_url = cfg.cache_url or f"{cache_dir.rstrip('/')}/metrics"
        self._extractor: FeatureExtractor | None = None
        self._refs: dict[tuple[int | None, bool], Features] = {}
        self.last_cache_hits: list[bool] = []

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = build_extractor(self.cfg, self.cache_dir, self.device)
        return self._extractor

    def reference(self, spec: MetricSpec, should_stop: StopCheck | None = None) -> Features:
        need = spec.needs_real_features
        for (num, has_feats), f in self._refs.items():  # a kept entry with features also serves FID
            if num == spec.num_real and (has_feats or not need):
                return f
        assert self.data_url is not None
        f, hit = reference_features(
            self.data_url, self.extractor, cache_url=self.cache_url, resolution=self.resolution,
            num_real=spec.num_real, need_features=need, batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers, device=self.device, progress=self.progress, should_stop=should_stop,
        )  # fmt: skip
        self.last_cache_hits.append(hit)
        self._refs[(spec.num_real, f.features is not None)] = f
        return f

    @torch.no_grad()
    def evaluate(self, sampler: Sampler, should_stop: StopCheck | None = None) -> dict[str, float]:
        """Every metric of `self.specs` for the sampler's generator. With `should_stop`, polled between batches,
        the evaluation raises `Abandoned` once it is true (a stop signal: nothing half-computed is returned)."""
        t0 = time.perf_counter()
        num_gen = max(s.num_gen for s in self.specs)
        gen = generated_features(
            sampler, self.extractor, num_gen, seed=self.cfg.seed, should_stop=should_stop,
            batch_size=self.cfg.batch_size, keep_logits=any(s.kind == "is" for s in self.specs),
            device=self.device, progress=self.progress,
        )  # fmt: skip
        assert gen.features is not None
        out: dict[str, float] = {}
        for s in self.specs:
            g = gen.features[: s.num_gen]
            if s.kind == "fid":
                stats = gen.stats if s.num_gen == num_gen else GaussianStats.of(g)
                out[s.name] = fid_from_stats(stats, self.reference(s, should_stop).stats)
            elif s.kind == "kid":
                real = self.reference(s, should_stop).features
                assert real is not None
                out[s.name], out[f"{s.name}_std"] = kid(g, real)
            elif s.kind == "pr":
                real = self.reference(s, should_stop).features
                assert real is not None
                out[f"{s.name}_precision"], out[f"{s.name}_recall"] = precision_recall(g, real, s.neighbours)
            elif s.kind == "is":
                assert gen.logits is not None
                out[s.name], out[f"{s.name}_std"] = inception_score(gen.logits[: s.num_gen])
        log.info("metrics in %.1fs: %s", time.perf_counter() - t0, out)
        return out


__all__ = ["LOWER_IS_BETTER", "Evaluator", "GeneratorInfo", "better", "load_generator_source"]
