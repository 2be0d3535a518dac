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
    accN                   class accuracy: the fraction of generated images 0..N-1 (classes drawn per image as for
                           every metric) that the dataset's classifier (`pipeline.metrics.classifier`) puts in
                           the class they were generated for
    accN_ceiling, _chance  that classifier's accuracy on held-out reals (what a perfect generator would score) and
                           1 / number of classes
    ifidN[_full]           intra-class FID: for each class of `eval.classes` (empty = all), FID of N images
                           generated for it against its reals; the mean over those classes
    confN                  recognisable samples: the fraction of generated images 0..N-1 whose top class under the
                           same classifier has probability >= `pipeline.metrics.classifier.CONFIDENT` (0.9)
    confN_reals            the same fraction of the classifier's held-out reals (measured when it was trained)
    confN_spread           how evenly the confidently classified images spread over the classes: the entropy of
                           their predicted-class histogram / ln(number of classes); 1 = even, 0 = all one class,
                           NaN when none is confident (confN is 0 then)
    confN_spread_reals     the same of the held-out reals
    eqtN_int, eqtN_frac    equivariance to translation by whole / fractional pixels (EQ-T, EQ-T_frac), and
    eqrN                   to rotation (EQ-R): PSNR in dB between images G draws moved by its input transform and
                           its unmoved images moved in pixel space (`pipeline.metrics.equivariance`; higher is
                           better). Groups of 4 images share one move, whatever `eval.batch_size` says
`last_details` holds what does not fit one number per key, for the JSON record of `ganpipe eval`: per metric,
acc's classifier (id, reals trained on and held out), ifid's value and real count per class, and conf's
classifier, threshold and per-class counts of confident images (generated: `counts`, held-out reals:
`counts_reals`; keyed by class index, with the manifest's `class_names` when it has them).
acc and ifid need a class-conditional generator, and acc, ifid and conf a dataset with class labels (one
`ConfigError` line naming the metrics otherwise, before anything is drawn). conf takes any generator; the
equivariance metrics a generator with an input transform (StyleGAN3), checked before anything is drawn too.
All ranks of a distributed job must call `evaluate` together; every rank returns the same numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.data import open_source
from pipeline.errors import ConfigError
from pipeline.export import open_networks
from pipeline.metrics.classifier import CONFIDENT, TrainedClassifier, confidence, dataset_classifier
from pipeline.metrics.config import EvalConfig
from pipeline.metrics.equivariance import check_input_transform, equivariance_metrics
from pipeline.metrics.extractors import FeatureExtractor, build_extractor
from pipeline.metrics.features import Features, StopCheck, generated_features
from pipeline.metrics.math import GaussianStats, fid_from_stats, inception_score, kid, precision_recall
from pipeline.metrics.refs import class_reference_stats, reference_features
from pipeline.metrics.spec import MetricSpec, parse_metric
from pipeline.models.sampling import Sampler
from pipeline.storage import user_url

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {
    "fid": True, "kid": True, "is": False, "clip_score": False, "acc": False, "ifid": True, "conf": False,
    "eqt_int": False, "eqt_frac": False, "eqr": False,
}  # fmt: skip


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` improves on `old` for `metric` (FID/KID/intra-class FID lower; IS/CLIP/accuracy, the share
    of confidently classified samples and equivariance PSNRs higher)."""
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
            names = ", ".join(s.name for s in self.specs if s.needs_reals)
            raise ConfigError(f"{names} need(s) the real images: pass --data DATA_URL (a shard folder)")
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
        self._classifier: TrainedClassifier | None = None
        self._refs: dict[tuple[int | None, bool], Features] = {}
        self._class_refs: dict[tuple[int | None, int], GaussianStats] = {}
        self._class_names: list[str] | None = None  # the manifest's, once `check_labels` has read it
        self.last_cache_hits: list[bool] = []
        self.last_details: dict[str, dict[str, Any]] = {}

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = build_extractor(self.cfg, self.cache_dir, self.device)
        return self._extractor

    @property
    def extractor_id(self) -> str | None:
        """The feature extractor's id, or None when no metric uses one (acc alone: nothing is loaded for it)."""
        return self.extractor.extractor_id if any(s.needs_extractor for s in self.specs) else None

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

    def classifier(self, should_stop: StopCheck | None = None, who: str = "acc") -> TrainedClassifier:
        """The dataset's classifier for `acc` and `conf` (cached on disk and, once loaded, here); `who` names the
        metrics in errors."""
        if self._classifier is None:
            assert self.data_url is not None
            self._classifier, hit = dataset_classifier(
                self.data_url, cache_url=self.cache_url, resolution=self.resolution, batch_size=self.cfg.batch_size,
                num_workers=self.cfg.num_workers, device=self.device, who=who, should_stop=should_stop,
            )  # fmt: skip
            self.last_cache_hits.append(hit)
        return self._classifier

    def class_references(
        self, spec: MetricSpec, classes: list[int], should_stop: StopCheck | None = None
    ) -> dict[int, GaussianStats]:
        """Per class: the Gaussian of its reals for `spec` (an ifid metric), cached on disk and here."""
        missing = [k for k in classes if (spec.num_real, k) not in self._class_refs]
        if missing:
            assert self.data_url is not None
            stats, hit = class_reference_stats(
                self.data_url, self.extractor, missing, cache_url=self.cache_url, resolution=self.resolution,
                num_real=spec.num_real, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                device=self.device, progress=self.progress, should_stop=should_stop,
            )  # fmt: skip
            self.last_cache_hits.append(hit)
            for k, st in stats.items():
                if st.num < 2:
                    raise ConfigError(
                        f"{spec.name}: class {k} has {st.num} real image(s) in {self.data_url!r} and a per-class FID "
                        "needs at least 2: leave it out of eval.classes"
                    )
                self._class_refs[(spec.num_real, k)] = st
        return {k: self._class_refs[(spec.num_real, k)] for k in classes}

    def check_labels(self) -> None:
        """acc, ifid and conf need a dataset with class labels: one `ConfigError` line naming the metrics and the
        fix otherwise (a dataset without a manifest is checked when its shards are read). Keeps the manifest's
        class names for `last_details`."""
        names = ", ".join(s.name for s in self.specs if s.needs_labels)
        assert self.data_url is not None
        manifest = open_source(self.data_url).manifest
        if manifest is not None and not manifest.has_labels:
            raise ConfigError(
                f"{names} need(s) class labels (.cls) but the dataset at {self.data_url!r} has none: write it with "
                "`ganpipe data shards --layout classes`"
            )
        self._class_names = manifest.class_names if manifest is not None else None

    def check_classes(self, sampler: Sampler) -> list[int]:
        """acc and ifid need a class-conditional generator whose classes are the dataset's: one `ConfigError`
        line naming the metrics and what is missing otherwise (after `check_labels`). Returns the classes ifid
        evaluates."""
        specs = [s for s in self.specs if s.needs_classes]
        names = ", ".join(s.name for s in specs)
        cond = sampler.conditioning
        if cond.kind != "class":
            raise ConfigError(
                f"{names} need(s) a class-conditional generator, and this one's conditioning is {cond.kind!r}: "
                "remove it from the metrics"
            )
        num_classes = int(cond.num_classes)  # type: ignore[attr-defined]
        assert self.data_url is not None
        manifest = open_source(self.data_url).manifest
        if manifest is not None and manifest.num_classes != num_classes:
            raise ConfigError(
                f"{names}: the generator has {num_classes} classes but the dataset at {self.data_url!r} has "
                f"{manifest.num_classes}: evaluate against the data it was trained on"
            )
        out_of_range = [k for k in self.cfg.classes if k >= num_classes]
        if out_of_range and any(s.kind == "ifid" for s in specs):
            raise ConfigError(
                f"eval.classes={self.cfg.classes} is invalid: {out_of_range} not in 0..{num_classes - 1} "
                f"(the generator's {num_classes} classes)"
            )
        return list(self.cfg.classes) or list(range(num_classes))

    @torch.no_grad()
    def evaluate(self, sampler: Sampler, should_stop: StopCheck | None = None) -> dict[str, float]:
        """Every metric of `self.specs` for the sampler's generator. With `should_stop`, polled between batches,
        the evaluation raises `Abandoned` once it is true (a stop signal: nothing half-computed is returned)."""
        t0 = time.perf_counter()
        self.last_details = {}
        if any(s.needs_labels for s in self.specs):
            self.check_labels()
        classes = self.check_classes(sampler) if any(s.needs_classes for s in self.specs) else []
        moved = [s for s in self.specs if s.needs_input_transform]
        if moved:
            check_input_transform(sampler, ", ".join(s.name for s in moved))
        out: dict[str, float] = {}
        pooled = [s for s in self.specs if s.kind != "ifid" and not s.needs_input_transform]  # one pass of images
        if pooled:
            out.update(self._pooled(sampler, pooled, should_stop))
        intra = [s for s in self.specs if s.kind == "ifid"]
        if intra:
            out.update(self._intra_class(sampler, intra, classes, should_stop))
        if moved:  # their own pass: each group of images is drawn once unmoved and once per kind of move
            out.update(
                equivariance_metrics(
                    sampler, moved, seed=self.cfg.seed, device=self.device, progress=self.progress,
                    should_stop=should_stop,
                )
            )  # fmt: skip
        log.info("metrics in %.1fs: %s", time.perf_counter() - t0, out)
        return out

    def _pooled(self, sampler: Sampler, specs: list[MetricSpec], should_stop: StopCheck | None) -> dict[str, float]:
        """Every metric but ifid, from one pass of generated images 0..max(N)-1 (acc and conf share its classifier
        outputs: one forward pass per batch)."""
        acc_specs = [s for s in specs if s.kind == "acc"]
        classified = [s for s in specs if s.needs_classifier]
        classifier = self.classifier(should_stop, ", ".join(s.name for s in classified)) if classified else None
        wanted = getattr(sampler.conditioning, "num_classes", None)
        if acc_specs and classifier is not None and classifier.num_classes != wanted:
            # only data without a manifest gets here: `check_classes` compared the manifest's count
            raise ConfigError(
                f"{acc_specs[0].name}: the generator has {wanted} classes but the labels in {self.data_url!r} go up "
                f"to {classifier.num_classes - 1}: evaluate against the data it was trained on"
            )
        num_gen = max(s.num_gen for s in specs)
        gen = generated_features(
            sampler, self.extractor if any(s.needs_extractor for s in specs) else None, num_gen,
            seed=self.cfg.seed, should_stop=should_stop, batch_size=self.cfg.batch_size,
            keep_logits=any(s.kind == "is" for s in specs),
            classifier=classifier.classify if classifier is not None else None, device=self.device,
            progress=self.progress,
        )  # fmt: skip
        out: dict[str, float] = {}
        for s in specs:
            if s.kind == "acc":
                assert classifier is not None and gen.labels is not None and gen.predictions is not None
                hits = gen.predictions[: s.num_gen] == gen.labels[: s.num_gen]
                out[s.name] = float(hits.double().mean())
                out[f"{s.name}_ceiling"] = classifier.heldout_accuracy
                out[f"{s.name}_chance"] = 1 / classifier.num_classes
                self.last_details[s.name] = {
                    "classifier": classifier.classifier_id,
                    "num_train": classifier.num_train,
                    "num_heldout": classifier.num_heldout,
                }
                continue
            if s.kind == "conf":
                assert classifier is not None and gen.predictions is not None and gen.confidences is not None
                out.update(self._conf(s, classifier, gen.predictions[: s.num_gen], gen.confidences[: s.num_gen]))
                continue
            assert gen.features is not None
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
        return out

    def _conf(
        self, spec: MetricSpec, classifier: TrainedClassifier, top_class: torch.Tensor, top_prob: torch.Tensor
    ) -> dict[str, float]:
        """conf's four numbers for generated images' classifications (`top_class`, `top_prob`); its details."""
        gen, reals = confidence(top_class, top_prob, classifier.num_classes), classifier.heldout_confidence
        self.last_details[spec.name] = {
            "classifier": classifier.classifier_id,
            "threshold": CONFIDENT,
            "num_heldout": reals.num,
            "counts": {str(k): n for k, n in enumerate(gen.counts)},
            "counts_reals": {str(k): n for k, n in enumerate(reals.counts)},
            **({"class_names": list(self._class_names)} if self._class_names else {}),
        }
        return {
            spec.name: gen.share,
            f"{spec.name}_reals": reals.share,
            f"{spec.name}_spread": gen.spread,
            f"{spec.name}_spread_reals": reals.spread,
        }

    def _intra_class(
        self, sampler: Sampler, specs: list[MetricSpec], classes: list[int], should_stop: StopCheck | None
    ) -> dict[str, float]:
        """ifid metrics: per class, one pass of max(N) images generated for it; each metric uses the first N."""
        refs = {s.name: self.class_references(s, classes, should_stop) for s in specs}
        num_gen = max(s.num_gen for s in specs)
        per_class: dict[str, dict[int, float]] = {s.name: {} for s in specs}
        for k in classes:
            gen = generated_features(
                sampler, self.extractor, num_gen, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                keep_features=any(s.num_gen < num_gen for s in specs), class_idx=k, device=self.device,
                progress=self.progress, should_stop=should_stop,
            )  # fmt: skip
            for s in specs:
                stats = gen.stats
                if s.num_gen < num_gen:
                    assert gen.features is not None
                    stats = GaussianStats.of(gen.features[: s.num_gen])
                per_class[s.name][k] = fid_from_stats(stats, refs[s.name][k])
        out: dict[str, float] = {}
        for s in specs:
            values = per_class[s.name]
            out[s.name] = float(np.mean(list(values.values())))
            self.last_details[s.name] = {
                "classes": {str(k): v for k, v in values.items()},
                "num_real": {str(k): refs[s.name][k].num for k in classes},
            }
        return out


__all__ = ["LOWER_IS_BETTER", "Evaluator", "GeneratorInfo", "better", "load_generator_source"]
