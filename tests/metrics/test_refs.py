"""Reference statistics: streamed once, cached per (dataset, resolution, extractor, count), hit and miss."""

from __future__ import annotations

import glob

import numpy as np
import torch

from pipeline.data import write_synthetic_dataset
from pipeline.metrics import SmallExtractor, reference_features
from pipeline.metrics.features import real_features
from pipeline.metrics.math import GaussianStats


def _ref(url: str, cache: str | None, ext=None, **kw):
    return reference_features(url, ext or SmallExtractor(), cache_url=cache, resolution=16, batch_size=16, **kw)


def test_streamed_sums_equal_gathered_features(shards) -> None:
    ext = SmallExtractor()
    streamed = real_features(shards, ext, resolution=16, batch_size=16)  # full FID: float64 sums only
    kept = real_features(shards, ext, resolution=16, batch_size=16, keep_features=True)
    assert streamed.features is None and kept.features is not None and kept.num == streamed.num == 48
    np.testing.assert_allclose(streamed.stats.mu, kept.stats.mu, rtol=1e-10)
    np.testing.assert_allclose(streamed.stats.sigma, kept.stats.sigma, rtol=1e-8, atol=1e-12)
    ref = GaussianStats.of(kept.features)
    np.testing.assert_allclose(ref.sigma, kept.stats.sigma, rtol=1e-10)


def test_cache_miss_then_hit(shards, cache) -> None:
    first, hit1 = _ref(shards, cache)
    second, hit2 = _ref(shards, cache)
    assert (hit1, hit2) == (False, True)
    assert len(glob.glob(f"{cache}/refs/small-seed0-16px-all-*.npz")) == 1
    np.testing.assert_array_equal(first.stats.sum, second.stats.sum)
    np.testing.assert_array_equal(first.stats.outer, second.stats.outer)


def test_what_changes_the_key_misses(shards, cache, tmp_path) -> None:
    _ref(shards, cache)
    # features wanted but the entry only has the Gaussian: recomputed, and the new entry serves both
    with_feats, hit = _ref(shards, cache, need_features=True)
    assert not hit and with_feats.features is not None and with_feats.features.shape == (48, 256)
    assert _ref(shards, cache)[1] and _ref(shards, cache, need_features=True)[1]
    # another count, another extractor, another dataset
    first_16, hit = _ref(shards, cache, num_real=16, need_features=True)
    assert not hit and first_16.num == 16
    assert not _ref(shards, cache, ext=SmallExtractor(seed=1))[1]
    other = str(tmp_path / "other")
    write_synthetic_dataset(other, n=40, resolution=16, seed=3, samples_per_shard=8)
    assert not _ref(other, cache)[1]
    assert len(glob.glob(f"{cache}/refs/*.npz")) == 4


def test_first_n_reals_are_the_first_keys(shards) -> None:
    ext = SmallExtractor()
    every = real_features(shards, ext, resolution=16, batch_size=5, keep_features=True)
    first = real_features(shards, ext, resolution=16, batch_size=7, num_real=10, keep_features=True)
    torch.testing.assert_close(first.features, every.features[:10])


def test_corrupt_entry_is_a_miss(shards, cache) -> None:
    _ref(shards, cache)
    (path,) = glob.glob(f"{cache}/refs/*.npz")
    with open(path, "wb") as fh:
        fh.write(b"not an npz")
    again, hit = _ref(shards, cache)
    assert not hit and again.num == 48
