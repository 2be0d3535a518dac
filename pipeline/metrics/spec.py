"""Metric names as users know them (`fid50k_full`, `kid50k_full`, `is50k`, `pr50k3_full`, `clip_score30k`, for
class-conditional generators `acc10k`, `ifid5k_full`, and for any generator of a labelled dataset `conf10k`) parsed
into what to compute.

Grammar: KIND COUNT [k] [NEIGHBOURS] [_full]
    KIND        fid | kid | is | pr | clip_score | acc | ifid | conf
    COUNT[k]    generated images (50k = 50000; a bare number such as fid256 is allowed for quick checks);
                for ifid, generated images per class
    NEIGHBOURS  pr only, after 'k' (pr50k3): the k of the k-NN manifolds, default 3
    _full       reals: the whole dataset (kid capped at 1M and pr at 200k images, as in StyleGAN2-ADA); for
                ifid every real of the class. Without it the reals are as many as the generated images (the
                first N sample keys of the leading shards that hold N samples; for ifid the class's first N
                keys, or all of them when it has fewer)

acc (class accuracy: a classifier trained on the labelled reals names the class of each generated image) and
ifid (intra-class FID: per class, generated images of that class against its reals; the mean over classes)
need a class-conditional generator and a labelled dataset; acc compares with no reals, so it takes no `_full`.
conf (recognisable samples: the share of generated images that classifier names with probability >= its
`CONFIDENT` threshold, and how evenly they spread over the classes, beside the same figures of its held-out
reals) needs a labelled dataset and any generator (unconditional, class or text); no `_full` either: its reals
are the classifier's held-out ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError

MetricKind = Literal["fid", "kid", "is", "pr", "clip_score", "acc", "ifid", "conf"]
KINDS: tuple[str, ...] = ("fid", "kid", "is", "pr", "clip_score", "acc", "ifid", "conf")
_PATTERN = re.compile(
    r"^(?P<kind>ifid|fid|kid|is|pr|clip_score|acc|conf)(?P<num>\d+)(?P<k>k?)(?P<nn>(?<=k)\d+)?(?P<full>_full)?$"
)
# Caps on "full" reals for metrics that keep every feature in memory (StyleGAN2-ADA's choices).
FULL_CAPS: dict[str, int | None] = {
    "fid": None, "kid": 1_000_000, "pr": 200_000, "is": None, "clip_score": None, "acc": None, "ifid": None,
    "conf": None,
}  # fmt: skip
# Metrics without real images to compare with (conf's reals are its classifier's held-out ones): no '_full'.
_NO_REALS = ("is", "clip_score", "acc", "conf")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    num_gen: int  # ifid: per class
    num_real: int | None  # None = every real image (ifid: of the class); 0 = no reals compared with
    neighbours: int = 3

    @property
    def needs_reals(self) -> bool:
        """Whether the dataset is needed: to compare with, or (acc, conf) to train the classifier on."""
        return self.kind in ("fid", "kid", "pr", "acc", "ifid", "conf")

    @property
    def needs_labels(self) -> bool:
        """Class accuracy, intra-class FID and recognisable samples: a dataset with class labels (.cls)."""
        return self.kind in ("acc", "ifid", "conf")

    @property
    def needs_classes(self) -> bool:
        """Class accuracy and intra-class FID: a class-conditional generator (and a labelled dataset)."""
        return self.kind in ("acc", "ifid")

    @property
    def needs_classifier(self) -> bool:
        """Class accuracy and recognisable samples: the dataset's classifier (`pipeline.metrics.classifier`)."""
        return self.kind in ("acc", "conf")

    @property
    def needs_extractor(self) -> bool:
        return self.kind in ("fid", "kid", "pr", "is", "ifid")

    @property
    def needs_real_features(self) -> bool:
        """KID and PR need every real feature; FID only the mean and covariance."""
        return self.kind in ("kid", "pr")


def parse_metric(name: str) -> MetricSpec:
    """`fid50k_full` -> MetricSpec; ConfigError naming the valid forms otherwise."""
    m = _PATTERN.match(name)
    if m is None or int(m["num"]) == 0:
        raise ConfigError(
            f"metric {name!r} is unknown: use KIND+COUNT[k][_full] with KIND in {', '.join(KINDS)} "
            "(e.g. fid50k_full, kid50k_full, is50k, pr50k3_full, clip_score30k, acc10k, ifid5k_full, conf10k, "
            "fid256)"
        )
    kind: MetricKind = m["kind"]  # type: ignore[assignment]
    num = int(m["num"]) * (1000 if m["k"] else 1)
    if m["nn"] is not None and kind != "pr":
        raise ConfigError(f"metric {name!r}: only pr takes a neighbour count after 'k' (e.g. pr50k3_full)")
    if m["full"] and kind in _NO_REALS:
        raise ConfigError(
            f"metric {name!r}: {kind} compares with no real images, drop '_full' (e.g. {kind}{m['num']}{m['k']})"
        )
    if kind == "ifid" and num < 2:
        raise ConfigError(f"metric {name!r}: a per-class FID needs at least 2 images per class (e.g. ifid5k)")
    neighbours = int(m["nn"]) if m["nn"] else 3
    if neighbours < 1:
        raise ConfigError(f"metric {name!r}: the neighbour count must be >= 1 (e.g. pr50k3_full)")
    if kind in _NO_REALS:
        num_real: int | None = 0
    elif m["full"]:
        num_real = FULL_CAPS[kind]
    else:
        num_real = num
    return MetricSpec(name, kind, num, num_real, neighbours)


__all__ = ["FULL_CAPS", "KINDS", "MetricKind", "MetricSpec", "parse_metric"]
