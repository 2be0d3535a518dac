"""modulated_conv2d: fused == non-fused == explicit per-sample weights; demodulation and fp16 behaviour."""

from __future__ import annotations

import itertools

import pytest
import torch
from ops_naive import naive_modulated_conv2d

from pipeline.ops import bias_act, demodulation_coefficients, modulated_conv2d, modulated_weight, setup_filter


def _inputs(n=3, i=4, o=5, k=3, h=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, h, h, generator=g, dtype=dtype)
    w = torch.randn(o, i, k, k, generator=g, dtype=dtype)
    s = torch.randn(n, i, generator=g, dtype=dtype) + 1
    return x, w, s


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("updown", [(1, 1), (2, 1), (1, 2)], ids=lambda p: f"up{p[0]}down{p[1]}")
def test_fused_and_nonfused_match_per_sample_definition(k, updown):
    up, down = updown
    x, w, s = _inputs(k=k, seed=k + up)
    f = setup_filter([1, 3, 3, 1])
    out_h = {(1, 1): 6, (2, 1): 12, (1, 2): 3}[updown]
    noise = torch.randn(3, 1, out_h, out_h, dtype=torch.float64)
    for demodulate, use_noise, flip_weight in itertools.product([True, False], [False, True], [True, False]):
        kwargs = dict(
            up=up,
            down=down,
            padding=k // 2,
            resample_filter=f,
            demodulate=demodulate,
            flip_weight=flip_weight,
            noise=noise if use_noise else None,
        )
        expected = naive_modulated_conv2d(x, w, s, **kwargs)
        for fused in (True, False):
            y = modulated_conv2d(x, w, s, fused_modconv=fused, **kwargs)
            assert y.shape == expected.shape == (3, 5, out_h, out_h)
            torch.testing.assert_close(y, expected, msg=lambda m, kw=kwargs, fu=fused: f"fused={fu} {kw}: {m}")


def test_demodulated_output_ignores_style_scale_but_plain_modulation_does_not():
    x, w, s = _inputs()
    scale = torch.tensor([[0.1], [3.0], [7.0]], dtype=torch.float64)
    for fused in (True, False):
        y = modulated_conv2d(x, w, s, padding=1, fused_modconv=fused)
        torch.testing.assert_close(modulated_conv2d(x, w, s * scale, padding=1, fused_modconv=fused), y)
        y_mod = modulated_conv2d(x, w, s, padding=1, demodulate=False, fused_modconv=fused)
        torch.testing.assert_close(
            modulated_conv2d(x, w, s * scale, padding=1, demodulate=False, fused_modconv=fused),
            y_mod * scale.reshape(3, 1, 1, 1),
        )


def test_demodulated_weights_have_unit_norm():
    _, w, s = _inputs()
    d = demodulation_coefficients(w, s)
    assert d.shape == (3, 5)
    wm = modulated_weight(w, s, d)
    assert wm.shape == (3, 5, 4, 3, 3)
    torch.testing.assert_close(wm.square().sum(dim=(2, 3, 4)), torch.ones(3, 5, dtype=torch.float64))
    # Explicit formula with the 1e-8 epsilon, on weights small enough for it to matter.
    tiny = w * 1e-5
    expected = ((tiny.unsqueeze(0) * s.reshape(3, 1, 4, 1, 1)).square().sum(dim=(2, 3, 4)) + 1e-8).rsqrt()
    torch.testing.assert_close(demodulation_coefficients(tiny, s), expected)


def test_noise_broadcasts():
    x, w, s = _inputs()
    base = modulated_conv2d(x, w, s, padding=1)
    for noise in (torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.randn(1, 1, 6, 6, dtype=torch.float64)):
        for fused in (True, False):
            torch.testing.assert_close(
                modulated_conv2d(x, w, s, noise=noise, padding=1, fused_modconv=fused), base + noise
            )


def test_epilogue_equals_bias_act_of_the_output():
    """bias/act/alpha/gain/clamp are the layer's bias_act, applied to the modulated convolution's output."""
    x, w, s = _inputs()
    b = torch.randn(5, dtype=torch.float64)
    for fused in (True, False):
        plain = modulated_conv2d(x, w, s, padding=1, fused_modconv=fused)
        for kwargs in (dict(act="lrelu"), dict(act="lrelu", gain=0.5, clamp=0.3), dict(act="elu", alpha=None)):
            torch.testing.assert_close(
                modulated_conv2d(x, w, s, padding=1, fused_modconv=fused, bias=b, **kwargs),
                bias_act(plain, b, **kwargs),
            )
    with pytest.raises(ValueError, match="unknown activation"):
        modulated_conv2d(x, w, s, padding=1, act="gelu")


def test_inputs_are_not_modified():
    x, w, s = _inputs(dtype=torch.float32)
    noise = torch.randn(3, 1, 6, 6)
    copies = [t.clone() for t in (x, w, s, noise)]
    for fused in (True, False):
        modulated_conv2d(x, w, s, noise=noise, padding=1, fused_modconv=fused)
    for t, c in zip((x, w, s, noise), copies, strict=True):
        assert torch.equal(t, c)


def test_float16_prenormalisation_avoids_overflow():
    x, w, s = _inputs(dtype=torch.float32)
    s = s * 3000.0  # un-normalised, x * s * w would overflow fp16 (max 65504)
    w = w * 30.0
    ref = modulated_conv2d(x, w, s, padding=1)
    for fused in (True, False):
        y = modulated_conv2d(x.half(), w, s, padding=1, fused_modconv=fused)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


def test_shape_assertions():
    x, w, s = _inputs()
    with pytest.raises(AssertionError):
        modulated_conv2d(x, w, s[:2])
    with pytest.raises(AssertionError):
        modulated_conv2d(x[:, :3], w, s)
