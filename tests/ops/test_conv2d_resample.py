"""conv2d_resample against its definition (zero-insert, pad once, conv, FIR, subsample) for every schedule."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from ops_naive import naive_conv2d_resample

from pipeline.ops import conv2d_resample, setup_filter

FILTERS = {"1331": [1.0, 3.0, 3.0, 1.0], "121": [1.0, 2.0, 1.0], "11": [1.0, 1.0]}


@pytest.mark.parametrize("updown", [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)], ids=lambda p: f"up{p[0]}down{p[1]}")
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_matches_definition(updown, k, groups):
    up, down = updown
    g = torch.Generator().manual_seed(k * 10 + groups)
    x = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, k, k, generator=g, dtype=torch.float64)
    for (fname, taps), padding, flip_weight, flip_filter in itertools.product(
        FILTERS.items(), [0, k // 2, (1, 0), (0, 2, 1, -1)], [True, False], [False, True]
    ):
        f = setup_filter(taps)
        kwargs = dict(
            up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight, flip_filter=flip_filter
        )
        y = conv2d_resample(x, w, f, **kwargs)
        expected = naive_conv2d_resample(x, w, f, **kwargs)
        assert y.shape == expected.shape, (fname, kwargs)
        torch.testing.assert_close(y, expected, msg=lambda m, kw=kwargs, fn=fname: f"{fn} {kw}: {m}")


def test_plain_conv_is_f_conv2d_and_flip_weight_false_is_true_convolution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    torch.testing.assert_close(conv2d_resample(x, w, padding=1), F.conv2d(x, w, padding=1))
    torch.testing.assert_close(
        conv2d_resample(x, w, padding=1, flip_weight=False), F.conv2d(x, w.flip([2, 3]), padding=1)
    )


def test_resampled_output_sizes():
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(1, 4, 8, 8)
    w3 = torch.randn(2, 4, 3, 3)
    w1 = torch.randn(2, 4, 1, 1)
    assert conv2d_resample(x, w3, f, up=2, padding=1, flip_weight=False).shape == (1, 2, 16, 16)
    assert conv2d_resample(x, w3, f, down=2, padding=1).shape == (1, 2, 4, 4)
    assert conv2d_resample(x, w1, f, up=2).shape == (1, 2, 16, 16)
    assert conv2d_resample(x, w1, f, down=2).shape == (1, 2, 4, 4)


def test_invalid_arguments():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(AssertionError):
        conv2d_resample(x, torch.randn(2, 4, 3, 3, dtype=torch.float64))  # dtype mismatch
    with pytest.raises(AssertionError):
        conv2d_resample(x, torch.randn(2, 3, 3, 3))  # channel mismatch
    with pytest.raises(AssertionError):
        conv2d_resample(x, torch.randn(3, 2, 3, 3), groups=2)  # out channels not divisible by groups
    with pytest.raises(AssertionError):
        conv2d_resample(x, torch.randn(2, 4, 3, 3), up=(2, 2))  # conv2d_resample takes int factors only
