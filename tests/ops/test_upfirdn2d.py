"""upfirdn2d, setup_filter and the filter2d/upsample2d/downsample2d helpers against the naive definition."""

from __future__ import annotations

import itertools

import pytest
import torch
from ops_cases import DOWNS, FILTERS, PADDINGS, UPS
from ops_naive import naive_upfirdn2d

from pipeline.ops import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d


@pytest.mark.parametrize("f", [f for _, f in FILTERS], ids=[name for name, _ in FILTERS])
def test_upfirdn2d_matches_definition(f):
    """Every up x down x padding x (flip_filter, gain) combination for one filter; too-small inputs must raise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    n_checked = 0
    for up, down, padding, (flip_filter, gain) in itertools.product(UPS, DOWNS, PADDINGS, [(False, 1.0), (True, 2.5)]):
        kwargs = dict(up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
        try:
            expected = naive_upfirdn2d(x, f, **kwargs)
        except RuntimeError:  # the naive canvas would have a negative size
            expected = None
        if expected is None or min(expected.shape[2:]) <= 0:
            with pytest.raises(AssertionError):
                upfirdn2d(x, f, **kwargs)
            continue
        y = upfirdn2d(x, f, **kwargs)
        assert y.shape == expected.shape and y.dtype == x.dtype, kwargs
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6, msg=lambda m, kw=kwargs: f"{kw}: {m}")
        n_checked += 1
    assert n_checked >= 100


def test_upfirdn2d_output_shape_formula():
    x = torch.randn(1, 2, 9, 11)
    f = setup_filter([1, 2, 3, 4, 5])  # 5x5
    y = upfirdn2d(x, f, up=(3, 2), down=(2, 4), padding=(1, -2, 4, 0))
    # H_out = (H*uy + py0 + py1 - fh) // dy + 1, W_out = (W*ux + px0 + px1 - fw) // dx + 1
    assert y.shape == (1, 2, (9 * 2 + 4 + 0 - 5) // 4 + 1, (11 * 3 + 1 - 2 - 5) // 2 + 1)


def test_flip_filter_is_correlation_for_asymmetric_filter():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # impulse: true convolution reproduces f around it, correlation the flipped f
    f = setup_filter(torch.arange(1.0, 10.0).reshape(3, 3), normalize=False)
    conv = upfirdn2d(x, f, padding=1)
    corr = upfirdn2d(x, f, padding=1, flip_filter=True)
    torch.testing.assert_close(conv[0, 0, 1:4, 1:4], f)
    torch.testing.assert_close(corr[0, 0, 1:4, 1:4], f.flip([0, 1]))


def test_gain_and_separable_equivalence():
    x = torch.randn(2, 3, 8, 8)
    taps = [1.0, 3.0, 3.0, 1.0]
    sep = upfirdn2d(x, setup_filter(taps, separable=True), up=2, padding=2, gain=3.0)
    full = upfirdn2d(x, setup_filter(taps, separable=False), up=2, padding=2, gain=3.0)
    torch.testing.assert_close(sep, full)
    torch.testing.assert_close(sep, 3.0 * upfirdn2d(x, setup_filter(taps), up=2, padding=2))


def test_helpers_keep_constant_images_constant_and_sizes():
    f = setup_filter([1, 3, 3, 1])
    x = torch.full((1, 2, 8, 8), 0.7)
    up = upsample2d(x, f)
    down = downsample2d(x, f)
    same = filter2d(x, f)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4) and same.shape == (1, 2, 8, 8)
    # Away from the zero-padded borders the DC level is preserved (upsample2d compensates zero insertion).
    torch.testing.assert_close(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 0.7))
    torch.testing.assert_close(down[:, :, 1:-1, 1:-1], torch.full_like(down[:, :, 1:-1, 1:-1], 0.7))
    torch.testing.assert_close(same[:, :, 2:-2, 2:-2], torch.full_like(same[:, :, 2:-2, 2:-2], 0.7))
    assert upsample2d(x, f, up=(2, 4)).shape == (1, 2, 32, 16)
    assert downsample2d(x, f, down=(4, 2)).shape == (1, 2, 4, 2)
    assert filter2d(x, f, padding=(1, 0, 2, -1)).shape == (1, 2, 9, 9)


@pytest.mark.parametrize("taps", [[1.0, 1.0], [1.0, 3.0, 3.0, 1.0], [1.0, 2.0, 3.0, 2.0, 1.0], [2.0] * 6])
def test_helpers_match_upfirdn2d_with_centring_padding(taps):
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    f = setup_filter(taps)
    fw = len(taps)
    torch.testing.assert_close(
        upsample2d(x, f, gain=1.5), naive_upfirdn2d(x, f, up=2, padding=[(fw + 1) // 2, (fw - 2) // 2] * 2, gain=6.0)
    )
    torch.testing.assert_close(
        downsample2d(x, f, flip_filter=True),
        naive_upfirdn2d(x, f, down=2, padding=[(fw - 1) // 2, (fw - 2) // 2] * 2, flip_filter=True),
    )
    torch.testing.assert_close(filter2d(x, f), naive_upfirdn2d(x, f, padding=[fw // 2, (fw - 1) // 2] * 2))


def test_setup_filter_rules():
    assert torch.equal(setup_filter(None), torch.ones(1, 1))
    f4 = setup_filter([1, 3, 3, 1])
    assert f4.shape == (4, 4) and f4.dtype == torch.float32
    torch.testing.assert_close(f4.sum(), torch.tensor(1.0))
    torch.testing.assert_close(f4, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)
    assert setup_filter([1.0] * 7).ndim == 2 and setup_filter([1.0] * 8).ndim == 1  # auto-separable from 8 taps
    assert setup_filter([1, 3, 3, 1], separable=True).shape == (4,)
    assert setup_filter([1.0] * 8, separable=False).shape == (8, 8)
    # gain ** (ndim / 2): both forms carry the same overall gain.
    torch.testing.assert_close(setup_filter([1, 2, 1], gain=4).sum(), torch.tensor(4.0))
    torch.testing.assert_close(setup_filter([1, 2, 1], gain=4, separable=True).sum(), torch.tensor(2.0))
    asym = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(setup_filter(asym, flip_filter=True, normalize=False), asym.flip([0, 1]))
    assert setup_filter([1, 2], normalize=False).sum().item() == 9.0


def test_setup_filter_does_not_modify_input():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    setup_filter(f)
    assert torch.equal(f, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_invalid_arguments():
    x = torch.randn(1, 1, 4, 4)
    f = setup_filter([1, 3, 3, 1])
    with pytest.raises(AssertionError):
        upfirdn2d(x[0], f)  # not 4-D
    with pytest.raises(AssertionError):
        upfirdn2d(x, f, padding=-1)  # 2x2 image smaller than the 4-tap filter
    with pytest.raises(AssertionError):
        upfirdn2d(x, f, up=0)
    with pytest.raises(AssertionError):
        upfirdn2d(x, f.requires_grad_())


def test_float16_input_keeps_dtype():
    x = torch.randn(1, 2, 6, 6)
    f = setup_filter([1, 3, 3, 1])
    y = upsample2d(x.half(), f)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), upsample2d(x, f), atol=1e-2, rtol=1e-2)
