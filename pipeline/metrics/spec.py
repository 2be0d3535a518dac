"""Metric names as users know them (`fid50k_full`, `kid50k_full`, `is50k`, `pr50k3_full`, `clip_score30k`, for
class-conditional generators `acc10k`, `ifid5k_full`, for any generator of a labelled dataset `conf10k`, and for
generators with an input transform (StyleGAN3) NVIDIA's equivariance metrics `eqt50k_int`, `eqt50k_frac`,
`eqr50k`) parsed into what to compute.

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

Equivariance (`pipeline.metrics.equivariance`): eqt COUNT [k] _int | _frac (translation by whole / fractional
pixels) and eqr COUNT [k] (rotation), kinds `eqt_int`, `eqt_frac`, `eqr`: PSNR between images G draws moved by
its input transform and its unmoved images moved in pixel space. They compare with no reals (no dataset, no
`_full`) and need a generator with an input transform.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError

MetricKind = Literal["fid", "kid", "is", "pr", "clip_score", "acc", "ifid", "conf", "eqt_int", "eqt_frac", "eqr"]
KINDS: tuple[str, ...] = ("fid", "kid", "is", "pr", "clip_score", "acc", "ifid", "conf", "eqt_int", "eqt_frac", "eqr")
EQ_KINDS: tuple[str, ...] = ("eqt_int", "eqt_frac", "eqr")  # NVIDIA's EQ-T, EQ-T_frac, EQ-R
_PATTERN = re.compile(
    r"^(?P<kind>ifid|fid|kid|is|pr|clip_score|acc|conf)(?P<num>\d+)(?P<k>k?)(?P<nn>(?<=k)\d+)?(?P<full>_full)?$"
)
# Equivariance names put their variant after the count (NVIDIA's eqt50k_int); anything after it is checked below.
_EQ_PATTERN = re.compile(r"^(?P<kind>eqt|eqr)(?P<num>\d+)(?P<k>k?)(?P<rest>.*)$")
# Caps on "full" reals for metrics that keep every feature in memory (StyleGAN2-ADA's choices).
FULL_CAPS: dict[str, int | None] = {
    "fid": None, "kid": 1_000_000, "pr": 200_000, "is": None, "clip_score": None, "acc": None, "ifid": None,
    "conf": None, "eqt_int": None, "eqt_frac": None, "eqr": None,
}  # fmt: skip
# Metrics without real images to compare with (conf's reals are its classifier's held-out ones): no '_full'.
_NO_REALS = ("is", "clip_score", "acc", "conf", *EQ_KINDS)


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
    def needs_input_transform(self) -> bool:
        """Equivariance: a generator whose image moves with its input transform (StyleGAN3), no dataset."""
        return self.kind in EQ_KINDS

    @property
    def needs_real_features(self) -> bool:
        """KID and PR need every real feature; FID only the mean and covariance."""
        return self.kind in ("kid", "pr")


def _parse_equivariance(name: str, m: re.Match[str]) -> MetricSpec:
    """eqtN_int, eqtN_frac, eqrN (N > 0, optionally with k) -> MetricSpec; ConfigError naming the fix otherwise."""
    count = f"{m['num']}{m['k']}"
    if int(m["num"]) == 0:
        raise ConfigError(f"metric {name!r}: the image count must be > 0 (e.g. {m['kind']}50k...)")
    rest = m["rest"]
    if rest.endswith("_full"):
        example = f"eqt{count}_int" if m["kind"] == "eqt" else f"eqr{count}"
        raise ConfigError(f"metric {name!r}: equivariance compares with no real images, drop '_full' (e.g. {example})")
    if m["kind"] == "eqt":
        if rest not in ("_int", "_frac"):
            raise ConfigError(
                f"metric {name!r}: say which translations, eqt{count}_int (whole pixels) or eqt{count}_frac "
                "(fractional)"
            )
        kind: MetricKind = "eqt_int" if rest == "_int" else "eqt_frac"
    else:
        if rest:
            raise ConfigError(f"metric {name!r}: rotation takes nothing after the count (e.g. eqr{count})")
        kind = "eqr"
    return MetricSpec(name, kind, int(m["num"]) * (1000 if m["k"] else 1), 0)


def parse_metric(name: str) -> MetricSpec:
    """`fid50k_full` -> MetricSpec; ConfigError naming the valid forms otherwise."""
    eq = _EQ_PATTERN.match(name)
    if eq is not None:
        return _parse_equivariance(name, eq)
    m = _PATTERN.match(name)
    if m is None or int(m["num"]) == 0:
        raise ConfigError(
            f"metric {name!r} is unknown: use KIND+COUNT[k][_full] with KIND in "
            f"{', '.join(k for k in KINDS if k not in EQ_KINDS)}, or eqtCOUNT[k]_int, eqtCOUNT[k]_frac, "
            "eqrCOUNT[k] (e.g. fid50k_full, kid50k_full, is50k, pr50k3_full, clip_score30k, acc10k, ifid5k_full, "
            "conf10k, eqt50k_int, eqr50k, fid256)"
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


__all__ = ["EQ_KINDS", "FULL_CAPS", "KINDS", "MetricKind", "MetricSpec", "parse_metric"]
