"""The `eval:` section of the config: which metrics, how often during training, and which feature extractor.

Contract: `EvalConfig.validate(prefix)` raises `ConfigError` naming the key, the value and what is allowed, like
every other section; metric names are checked here (not at evaluation time) so a typo fails before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import ConfigError, require

# torch-fidelity's conversion of the TF Inception graph the field's FID uses (2015-12-05, Apache-2.0 weights).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


@dataclass
class EvalConfig:
    """Evaluation during training (`metrics` non-empty) and the defaults of `ganpipe eval`."""

    metrics: list[str] = field(default_factory=list)  # e.g. [fid50k_full, kid50k_full]; empty = no evaluation
    every_kimg: float = 50  # evaluate G_ema when kimg crosses a multiple of this, and at the end of training
    extractor: Literal["inception", "small"] = "inception"  # 'small': fast CPU tracking, not comparable to papers
    inception_weights: str = INCEPTION_URL  # local path or URL (copied once into the cache)
    small_weights: str | None = None  # null = the small extractor's fixed seeded initialisation
    clip_model: str | None = None  # Hugging Face CLIP folder (local path or name in the HF cache) for clip_score
    resize: Literal["clean", "legacy"] = "clean"  # clean: PIL bicubic (clean-fid); legacy: TF1 bilinear (NVIDIA)
    batch_size: int = 64  # images per feature-extraction batch and per generator call, per rank
    num_workers: int = 0  # data-loading processes per rank while reading reals
    seed: int = 0  # latents of generated images: image i always gets the same z whatever the number of ranks
    cache_url: str | None = None  # reference statistics cache (any fsspec URL); null = <data cache>/metrics
    best_metric: str | None = None  # one of `metrics`: keep checkpoints/best-<metric>.pt of its best value
    classes: list[int] = field(default_factory=list)  # intra-class FID (ifid): class indices; empty = every class

    def validate(self, prefix: str) -> None:
        from pipeline.metrics.spec import parse_metric  # late: spec imports nothing heavy, but keep config light

        for name in self.metrics:
            try:
                parse_metric(name)
            except ConfigError as e:
                raise ConfigError(f"{prefix}.metrics: {e}") from None
        require(len(set(self.metrics)) == len(self.metrics), f"{prefix}.metrics", self.metrics, "lists a metric twice")
        require(self.every_kimg > 0, f"{prefix}.every_kimg", self.every_kimg, "must be > 0")
        require(self.batch_size > 0, f"{prefix}.batch_size", self.batch_size, "must be a positive integer")
        require(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "must be >= 0")
        require(self.seed >= 0, f"{prefix}.seed", self.seed, "must be >= 0")
        require(
            self.best_metric is None or self.best_metric in self.metrics,
            f"{prefix}.best_metric",
            self.best_metric,
            f"must be one of {prefix}.metrics ({', '.join(self.metrics) or 'empty'}) or null",
        )
        require(
            self.best_metric is None or parse_metric(self.best_metric).kind != "pr",
            f"{prefix}.best_metric",
            self.best_metric,
            "cannot rank checkpoints by precision/recall (two numbers): choose a fid, kid, is, acc, ifid, conf, "
            "eqt or eqr metric",
        )
        require(
            all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.classes),
            f"{prefix}.classes",
            self.classes,
            "must be class indices >= 0 (e.g. [0, 3, 7]; empty = every class)",
        )
        require(len(set(self.classes)) == len(self.classes), f"{prefix}.classes", self.classes, "lists a class twice")
        require(
            self.extractor != "small" or not any(parse_metric(m).kind == "is" for m in self.metrics),
            f"{prefix}.extractor",
            self.extractor,
            "has no class logits: Inception Score needs eval.extractor=inception",
        )


def parse_classes(text: str, key: str) -> list[int]:
    """'0,3,7' -> [0, 3, 7] (a command line's `eval.classes`); ConfigError naming `key` otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{key} {text!r} is invalid: give comma-separated class indices, e.g. 0,3,7") from None


__all__ = ["INCEPTION_URL", "EvalConfig", "parse_classes"]
