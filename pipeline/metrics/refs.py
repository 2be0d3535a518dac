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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from pipeline.data import open_source
from pipeline.metrics.extractors import FeatureExtractor
from pipeline.metrics.features import Features, StopCheck, real_features, world
from pipeline.metrics.math import GaussianStats
from pipeline.storage import publish_atomic

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass(frozen=True)
class ReferenceKey:
    dataset: str  # sha256 of the manifest (or shard list)
    resolution: int | None
    extractor_id: str
    num_real: int | None

    @property
    def digest(self) -> str:
        text = json.dumps([CACHE_VERSION, self.dataset, self.resolution, self.extractor_id, self.num_real])
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def url(self, cache_url: str) -> str:
        count = "all" if self.num_real is None else str(self.num_real)
        return f"{cache_url.rstrip('/')}/refs/{self.extractor_id}-{self.resolution}px-{count}-{self.digest}.npz"


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


__all__ = ["CACHE_VERSION", "ReferenceKey", "dataset_fingerprint", "reference_features"]
