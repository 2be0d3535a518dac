"""Metric names as users know them (`fid50k_full`, `kid50k_full`, `is50k`, `pr50k3_full`, `clip_score30k`) parsed
into what to compute.

Grammar: KIND COUNT [k] [NEIGHBOURS] [_full]
    KIND        fid | kid | is | pr | clip_score
    COUNT[k]    generated images (50k = 50000; a bare number such as fid256 is allowed for quick checks)
    NEIGHBOURS  pr only, after 'k' (pr50k3): the k of the k-NN manifolds, default 3
    _full       reals: the whole dataset (kid capped at 1M and pr at 200k images, as in StyleGAN2-ADA);
                without it the reals are as many as the generated images (the first N sample keys of the
                leading shards that hold N samples)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError

MetricKind = Literal["fid", "kid", "is", "pr", "clip_score"]
_PATTERN = re.compile(r"^(?P<kind>fid|kid|is|pr|clip_score)(?P<num>\d+)(?P<k>k?)(?P<nn>(?<=k)\d+)?(?P<full>_full)?$")
# Caps on "full" reals for metrics that keep every feature in memory (StyleGAN2-ADA's choices).
FULL_CAPS: dict[str, int | None] = {"fid": None, "kid": 1_000_000, "pr": 200_000, "is": None, "clip_score": None}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    num_gen: int
    num_real: int | None  # None = every real image; 0 = reals not needed
    neighbours: int = 3

    @property
    def needs_reals(self) -> bool:
        return self.kind in ("fid", "kid", "pr")

    @property
    def needs_real_features(self) -> bool:
        """KID and PR need every real feature; FID only the mean and covariance."""
        return self.kind in ("kid", "pr")


def parse_metric(name: str) -> MetricSpec:
    """`fid50k_full` -> MetricSpec; ConfigError naming the valid forms otherwise."""
    m = _PATTERN.match(name)
    if m is None or int(m["num"]) == 0:
        raise ConfigError(
            f"metric {name!r} is unknown: use KIND+COUNT[k][_full] with KIND in fid, kid, is, pr, clip_score "
            "(e.g. fid50k_full, kid50k_full, is50k, pr50k3_full, clip_score30k, fid256)"
        )
    kind: MetricKind = m["kind"]  # type: ignore[assignment]
    num = int(m["num"]) * (1000 if m["k"] else 1)
    if m["nn"] is not None and kind != "pr":
        raise ConfigError(f"metric {name!r}: only pr takes a neighbour count after 'k' (e.g. pr50k3_full)")
    if m["full"] and kind in ("is", "clip_score"):
        raise ConfigError(f"metric {name!r}: {kind} uses no real images, drop '_full' (e.g. {kind}{m['num']}{m['k']})")
    neighbours = int(m["nn"]) if m["nn"] else 3
    if neighbours < 1:
        raise ConfigError(f"metric {name!r}: the neighbour count must be >= 1 (e.g. pr50k3_full)")
    if kind in ("is", "clip_score"):
        num_real: int | None = 0
    elif m["full"]:
        num_real = FULL_CAPS[kind]
    else:
        num_real = num
    return MetricSpec(name, kind, num, num_real, neighbours)


__all__ = ["FULL_CAPS", "MetricKind", "MetricSpec", "parse_metric"]
