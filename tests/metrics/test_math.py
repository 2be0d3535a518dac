"""The metric formulas against independent computations on the same features (1e-4 relative)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from scipy.spatial.distance import cdist

from pipeline.metrics.math import (
    GaussianStats,
    clip_score,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

REL = 1e-4


@pytest.fixture
def feats() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 32, generator=gen, dtype=torch.float64)
    b = torch.randn(300, 32, generator=gen, dtype=torch.float64) * 1.2 + 0.3
    b[:, :4] += torch.randn(300, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, 4, generator=gen).double()
    return a.float(), b.float()


def test_gaussian_stats_match_numpy(feats) -> None:
    a, _ = feats
    s = GaussianStats.empty(32)
    s.add(a[:150])
    s.add(a[150:])  # sums over parts (as ranks do) equal the statistics of the whole
    x = a.double().numpy()
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_of_a_set_with_itself_is_zero(feats) -> None:
    a, _ = feats
    s = GaussianStats.of(a)
    assert abs(fid_from_stats(s, s)) < 1e-6


def test_fid_matches_scipy_torch_fidelity_and_torchmetrics(feats) -> None:
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    a, b = (f.double().numpy() for f in feats)
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = fid_from_stats(GaussianStats.of(feats[0]), GaussianStats.of(feats[1]))
    # scipy spelled out independently (pytorch-fid's formula)
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    # torch-fidelity's eigenvalue shortcut and torchmetrics' torch computation
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    tm = float(_compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))))
    assert ours > 0.5
    sqrtm = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    for other in (ref, tf["frechet_inception_distance"], tm):
        assert ours == pytest.approx(other, rel=REL)
    assert ours == pytest.approx(sqrtm, rel=1e-9)  # our fast path is scipy's sqrtm result, not an approximation


def test_fid_matches_sqrtm_with_realistic_spectra() -> None:
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((128, 128)) / 11
    a = rng.standard_normal((1000, 128)) @ mix * np.linspace(0.01, 3, 128)  # decaying, correlated spectrum
    b = rng.standard_normal((1000, 128)) @ mix * np.linspace(0.02, 2.5, 128) + 0.05
    sa, sb = GaussianStats.of(a), GaussianStats.of(b)
    fast = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert fast == pytest.approx(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, method="sqrtm"), rel=1e-8)


def test_fid_survives_singular_covariances() -> None:
    x = torch.randn(10, 64)  # fewer samples than dimensions: rank-deficient covariances
    y = torch.randn(10, 64) + 1
    sx, sy = GaussianStats.of(x), GaussianStats.of(y)
    value = frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma, method="sqrtm"), rel=1e-4)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731 - the cubic polynomial kernel of Binkowski et al.
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = x.shape[0]
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def test_kid_matches_the_unbiased_mmd_formula(feats) -> None:
    a, b = feats
    a, b = a[:300], b[:300]
    mean, std = kid(a, b, subsets=1, subset_size=300)  # one subset of everything: no sampling involved
    assert mean == pytest.approx(_mmd2_unbiased(a.double().numpy(), b.double().numpy()), rel=REL)
    assert std == 0
    same = torch.randn(600, 32, generator=torch.Generator().manual_seed(5))
    same_mean, _ = kid(same[:300], same[300:], subsets=1, subset_size=300)  # two samples of one distribution
    assert abs(same_mean) < 0.01 * mean


def test_kid_subsets_are_seeded(feats) -> None:
    a, b = feats
    assert kid(a, b, subsets=5, subset_size=100, seed=1) == kid(a, b, subsets=5, subset_size=100, seed=1)


def test_inception_score_matches_scipy() -> None:
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(1)) * 3
    p = scipy.special.softmax(logits.double().numpy(), axis=1)
    perm = np.random.RandomState(2020).permutation(200)  # torch-fidelity's documented seeded shuffle
    scores = []
    for part in np.array_split(p[perm], 4):
        kl = scipy.special.rel_entr(part, part.mean(0, keepdims=True)).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(float(np.mean(scores)), rel=REL)
    assert std == pytest.approx(float(np.std(scores)), rel=REL)
    assert inception_score(torch.zeros(50, 10), splits=1)[0] == pytest.approx(1.0)


def test_precision_recall_match_brute_force(feats) -> None:
    gen, real = (f.double().numpy() for f in feats)
    k = 3
    r_real = np.sort(cdist(real, real), axis=1)[:, k]  # k-th neighbour, self at column 0
    r_gen = np.sort(cdist(gen, gen), axis=1)[:, k]
    precision = (cdist(gen, real) <= r_real[None, :]).any(axis=1).mean()
    recall = (cdist(real, gen) <= r_gen[None, :]).any(axis=1).mean()
    p, r = precision_recall(feats[0], feats[1], neighbours=k, batch_size=64)  # batched: same answer
    assert p == pytest.approx(precision, rel=REL)
    assert r == pytest.approx(recall, rel=REL)
    assert 0 < p < 1 and 0 < r < 1


def test_clip_score_definition() -> None:
    img = torch.randn(20, 8)
    txt = torch.randn(20, 8)
    cos = (img * txt).sum(1) / (img.norm(dim=1) * txt.norm(dim=1))
    assert clip_score(img, txt) == pytest.approx(float(100 * cos.clamp(min=0).mean()), rel=REL)
    assert clip_score(img, img) == pytest.approx(100.0)
