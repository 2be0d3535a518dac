"""Evaluation: feature extractors, FID/KID/IS/precision-recall/CLIP score, class accuracy and intra-class FID of
class-conditional generators, recognisable samples (conf) of any generator, NVIDIA's equivariance metrics
(EQ-T, EQ-T_frac, EQ-R) of generators with an input transform, reference statistics, distributed.

Public API
    EvalConfig                      the `eval:` config section
    parse_metric / MetricSpec       `fid50k_full` -> what to compute
    Evaluator                       metrics of a generator against one dataset (training callback, CLI)
    load_generator_source           G_ema from an export folder, checkpoint or run dir
    build_extractor, InceptionV3, SmallExtractor, random_inception_state_dict
    reference_features              cached reference statistics (`ganpipe eval stats`)
    class_reference_stats           cached per-class reference statistics (intra-class FID)
    dataset_classifier              the cached classifier of a labelled dataset (class accuracy, conf)
    equivariance_metrics            eqtN_int / eqtN_frac / eqrN PSNRs of a generator with an input transform
    frechet_distance, kid, inception_score, precision_recall, clip_score, GaussianStats
    CLIPEncoder (pipeline.metrics.clip, imports transformers lazily)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.metrics.config import INCEPTION_URL, EvalConfig

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` below imports on first use
    from pipeline.metrics.classifier import ClassifierRecipe, SmallClassifier, TrainedClassifier, dataset_classifier
    from pipeline.metrics.equivariance import equivariance_metrics
    from pipeline.metrics.evaluate import Evaluator, GeneratorInfo, better, load_generator_source
    from pipeline.metrics.extractors import (
        FeatureExtractor,
        InceptionV3,
        SmallExtractor,
        build_extractor,
        random_inception_state_dict,
    )
    from pipeline.metrics.features import Features, generated_features, real_features
    from pipeline.metrics.math import (
        GaussianStats,
        clip_score,
        fid_from_stats,
        frechet_distance,
        inception_score,
        kid,
        precision_recall,
    )
    from pipeline.metrics.refs import class_reference_stats, reference_features
    from pipeline.metrics.spec import MetricSpec, parse_metric

# Everything else loads on first use: `pipeline.config` needs only EvalConfig, and an evaluation's heavy imports
# (torch-fidelity, scipy) wait until something is evaluated.
_LAZY = {
    "ClassifierRecipe": "classifier",
    "SmallClassifier": "classifier",
    "TrainedClassifier": "classifier",
    "dataset_classifier": "classifier",
    "equivariance_metrics": "equivariance",
    "Evaluator": "evaluate",
    "GeneratorInfo": "evaluate",
    "better": "evaluate",
    "load_generator_source": "evaluate",
    "FeatureExtractor": "extractors",
    "InceptionV3": "extractors",
    "SmallExtractor": "extractors",
    "build_extractor": "extractors",
    "random_inception_state_dict": "extractors",
    "Features": "features",
    "generated_features": "features",
    "real_features": "features",
    "GaussianStats": "math",
    "clip_score": "math",
    "fid_from_stats": "math",
    "frechet_distance": "math",
    "inception_score": "math",
    "kid": "math",
    "precision_recall": "math",
    "class_reference_stats": "refs",
    "reference_features": "refs",
    "MetricSpec": "spec",
    "parse_metric": "spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"pipeline.metrics.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline.metrics' has no attribute {name!r}")


__all__ = [
    "INCEPTION_URL",
    "ClassifierRecipe",
    "EvalConfig",
    "Evaluator",
    "FeatureExtractor",
    "Features",
    "GaussianStats",
    "GeneratorInfo",
    "InceptionV3",
    "MetricSpec",
    "SmallClassifier",
    "SmallExtractor",
    "TrainedClassifier",
    "better",
    "build_extractor",
    "class_reference_stats",
    "clip_score",
    "dataset_classifier",
    "equivariance_metrics",
    "fid_from_stats",
    "frechet_distance",
    "generated_features",
    "inception_score",
    "kid",
    "load_generator_source",
    "parse_metric",
    "precision_recall",
    "random_inception_state_dict",
    "real_features",
    "reference_features",
]
