"""Reference statistics of real images: computed once per (dataset, resolution, extractor, count), cached as
`.npz` on any fsspec URL.

Job: `reference_features(...)` returns the reals' `Features` from the cache when an entry fits, else streams the
shards (every rank its share), writes the entry (rank 0, atomically) and returns it. `ganpipe eval stats` calls
it ahead of training so the first evaluation does not pay for it.

The cache key is a sha256 of: the dataset's manifest (names, counts and checksums of its shards, so re-sharded or
edited data never hits an old entry; the shard list when there is no manifest), the resolution, the extractor's
id (architecture, weights sha, resize policy) and the number of reals. An entry holds the float64 sums of the
Gaussian (`num`, `sum`, `outer`), and the features themselves when a metric needed them (KID, PR); an entry
without features does not satisfy a request for them and is replaced.

Intra-class FID's references (`class_reference_stats`) are one entry per class: the same key plus the class
index, the Gaussian of that class's reals (all of them, or its first N sample keys).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from pipeline.data import open_source
from pipeline.metrics.extractors import FeatureExtractor
from pipeline.metrics.features import Features, StopCheck, real_class_stats, real_features, world
from pipeline.metrics.math import GaussianStats
from pipeline.storage import publish_atomic

log = logging.getLogger(__name__)
CACHE_VERSION = 1
CLASS_STATS_BUDGET = 2 << 30  # bytes of per-class accumulators one pass over the reals may hold (intra-class FID)


@dataclass(frozen=True)
class ReferenceKey:
    dataset: str  # sha256 of the manifest (or shard list)
    resolution: int | None
    extractor_id: str
    num_real: int | None
    class_idx: int | None = None  # the reals of one class (intra-class FID); None = every class

    @property
    def digest(self) -> str:
        parts: list[object] = [CACHE_VERSION, self.dataset, self.resolution, self.extractor_id, self.num_real]
        if self.class_idx is not None:  # appended only when set: whole-dataset entries keep their old digests
            parts.append(["class", self.class_idx])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]

    def url(self, cache_url: str) -> str:
        count = "all" if self.num_real is None else str(self.num_real)
        cls = "" if self.class_idx is None else f"-class{self.class_idx}"
        return f"{cache_url.rstrip('/')}/refs/{self.extractor_id}-{self.resolution}px-{count}{cls}-{self.digest}.npz"


def dataset_fingerprint(url: str) -> str:
    source = open_source(url)
    text = source.manifest.to_json() if source.manifest is not None else source.fingerprint + "".join(source.shard_urls)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(url: str, need_features: bool) -> Features | None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    try:
        with np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION:
                return None
            if need_features and "features" not in z:
                return None
            stats = GaussianStats(int(z["num"]), z["sum"].copy(), z["outer"].copy())
            feats = torch.from_numpy(z["features"].copy()) if "features" in z else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # corrupt or foreign: a miss, not a failure
        log.warning("ignoring unreadable reference statistics %s (%s)", url, e)
        return None
    return Features(stats, feats)


def _write(url: str, f: Features) -> None:
    arrays: dict[str, np.ndarray] = {
        "version": np.array(CACHE_VERSION),
        "num": np.array(f.stats.num),
        "sum": f.stats.sum,
        "outer": f.stats.outer,
    }
    if f.features is not None:
        arrays["features"] = f.features.numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    publish_atomic(url, buffer.getvalue())  # readers never see a half-written entry


def reference_features(
    url: str,
    extractor: FeatureExtractor,
    *,
    cache_url: str | None,
    resolution: int | None,
    num_real: int | None = None,
    need_features: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    should_stop: StopCheck | None = None,
) -> tuple[Features, bool]:
    """(the reals' features, whether the cache had them). `cache_url=None` disables the cache; `should_stop` as in
    `real_features` (an abandoned computation is not cached)."""
    key = ReferenceKey(dataset_fingerprint(url), resolution, extractor.extractor_id, num_real)
    entry = key.url(cache_url) if cache_url else None
    if entry is not None:
        found = _read(entry, need_features)
        if found is not None:
            log.info("reference statistics: cache hit %s", entry)
            return found, True
    log.info("reference statistics: computing %s", entry or "(no cache)")
    feats = real_features(
        url, extractor, resolution=resolution, batch_size=batch_size, num_workers=num_workers, num_real=num_real,
        keep_features=need_features, device=device, progress=progress, should_stop=should_stop,
    )  # fmt: skip
    rank, size = world()
    if entry is not None and rank == 0:
        _write(entry, feats)
    if size > 1:
        dist.barrier()  # no rank reads the entry before it exists
    return feats, False


def class_groups(
    classes: Sequence[int], dim: int, num_real: int | None, budget: int = CLASS_STATS_BUDGET
) -> list[list[int]]:
    """`classes` split into groups whose per-class accumulators (see `real_class_stats`) fit in `budget` bytes:
    one pass over the reals per group. 1000 Inception classes (32 MiB of float64 sums each) take 16 passes."""
    per_class = dim * dim * 8 + (0 if num_real is None else 2 * num_real * dim * 4)
    size = max(1, budget // per_class)
    items = list(classes)
    return [items[i : i + size] for i in range(0, len(items), size)]


def class_reference_stats(
    url: str,
    extractor: FeatureExtractor,
    classes: Sequence[int],
    *,
    cache_url: str | None,
    resolution: int | None,
    num_real: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    should_stop: StopCheck | None = None,
) -> tuple[dict[int, GaussianStats], bool]:
    """(per class in `classes`: the Gaussian of its reals, whether the cache had every class). Each class is its
    own cache entry (`ReferenceKey.class_idx`), so evaluating other classes later reuses these; the missing ones
    are computed together, one pass over the reals per memory group (`class_groups`). `should_stop` as in
    `real_features`."""
    fingerprint = dataset_fingerprint(url)
    keys = {k: ReferenceKey(fingerprint, resolution, extractor.extractor_id, num_real, k) for k in classes}
    out: dict[int, GaussianStats] = {}
    if cache_url:
        for k, key in keys.items():
            found = _read(key.url(cache_url), need_features=False)
            if found is not None:
                out[k] = found.stats
    missing = [k for k in classes if k not in out]
    if not missing:
        log.info("per-class reference statistics: cache hit for %d classes", len(out))
        return {k: out[k] for k in classes}, True
    log.info("per-class reference statistics: computing %d classes (%d cached)", len(missing), len(out))
    rank, size = world()
    for group in class_groups(missing, extractor.dim, num_real):
        stats = real_class_stats(
            url, extractor, group, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            num_real=num_real, device=device, progress=progress, should_stop=should_stop,
        )  # fmt: skip
        for k, s in stats.items():
            out[k] = s
            if cache_url and rank == 0 and s.num >= 2:  # a class too small to use is an error, not an entry
                _write(keys[k].url(cache_url), Features(s))
    if size > 1:
        dist.barrier()  # no rank reads the entries before they exist
    return {k: out[k] for k in classes}, False  # in the order asked for


__all__ = [
    "CACHE_VERSION",
    "CLASS_STATS_BUDGET",
    "ReferenceKey",
    "class_groups",
    "class_reference_stats",
    "dataset_fingerprint",
    "reference_features",
]
