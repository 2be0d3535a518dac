"""StyleGAN3 generator: NVIDIA's names and outputs, the paper's filter design, the input transform, the magnitude
EMA, and the Triton filtered_lrelu inside the whole synthesis network.

The fixtures hold tensors only: weights of small StyleGAN3-T and -R generators built by NVIDIA's public code
(`training/networks_stylegan3.py`, run outside this project on the CPU reference ops), with the inputs and the
outputs it produced, and the per-layer design its code computed (metadata). Loading them with `strict=True` proves
the naming; comparing outputs proves the math. tools/fixtures/make_nvlabs_stylegan3_fixture.py makes them from a
checkout of NVIDIA's repository, importing its code from there at run time (its docstring has the command line).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models import stylegan2
from pipeline.models.stylegan3 import (
    Generator,
    StyleGAN3Config,
    SynthesisConfig,
    SynthesisInput,
    design_layers,
    magnitude_ema_beta,
    nvlabs_preset,
)
from pipeline.ops._dispatch import triton_unavailable_reason
from pipeline.schema import parse_section
from tests.models.nvlabs_stylegan3_fixture import fixture, fixture_config

TAGS = ("t", "r")
RESOLUTIONS = (16, 32)
PSIS = ("1", "0.7")
PARITY_TARGET = 1e-4  # issue 17: max abs difference to NVIDIA's outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------------
# Fixture helpers


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def ours_for(tag: str, resolution: int, load: bool = True) -> tuple[Generator, dict[str, torch.Tensor]]:
    """Our generator for a fixture entry (NVIDIA's weights loaded strictly unless load=False) and its tensors."""
    meta, _, tensors = fixture(tag)
    torch.manual_seed(0)
    G = Generator(fixture_config(meta), resolution, magnitude_ema_beta=meta["magnitude_ema_beta"]).eval()
    entry = section(tensors, f"{resolution}/")
    if load:
        G.load_state_dict(section(entry, "G/"), strict=True)
    return G, entry


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA parity


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_nvidia_state_dict_loads_strictly(tag: str, resolution: int) -> None:
    G, entry = ours_for(tag, resolution, load=False)
    theirs = section(entry, "G/")
    ours = G.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    G.load_state_dict(theirs, strict=True)
    assert any(k.endswith("down_filter") and v.ndim == 2 for k, v in theirs.items()) == (tag == "r")


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("psi", PSIS)
def test_outputs_match_nvidia(tag: str, resolution: int, psi: str) -> None:
    """Same weights, same z (and c), NVIDIA's non-identity input transform: the same images, with either
    modulated-conv schedule."""
    G, entry = ours_for(tag, resolution)
    assert not torch.equal(G.synthesis.input.transform, torch.eye(3))
    expected = entry[f"G_out_psi{psi}"]
    assert expected.std() > 0.01  # not a vacuous comparison
    with torch.no_grad():
        for fused in (True, False):
            ours = G(entry["z"], entry.get("c"), truncation_psi=float(psi), fused_modconv=fused)
            diff = max_abs(ours, expected)
            assert diff < PARITY_TARGET, f"{tag} {resolution}px psi={psi} fused={fused}: max abs diff {diff:.3g}"
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_update_emas_matches_nvidia(tag: str, resolution: int) -> None:
    """A training call with update_emas=True: every layer's magnitude EMA (and w_avg) is updated first, as NVIDIA's."""
    G, entry = ours_for(tag, resolution)
    G.train()
    with torch.no_grad():
        ours = G(entry["z"], entry.get("c"), update_emas=True)
    torch.testing.assert_close(ours, entry["G_out_update_emas"], rtol=1e-4, atol=1e-5)
    buffers = dict(G.named_buffers())
    expected = section(entry, "emas/")
    assert len(expected) == G.synthesis.num_layers + 2  # every layer's magnitude_ema and w_avg
    for name, value in expected.items():
        assert not torch.allclose(value, entry[f"G/{name}"]), f"{name}: the update should move it"
        torch.testing.assert_close(buffers[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_layer_design_and_filters_match_nvidia(tag: str, resolution: int) -> None:
    """Before loading anything, our freshly designed filters are NVIDIA's and every layer's numbers agree with what
    NVIDIA's code computed (sampling rates, cutoffs, half-widths, sizes, factors, taps, padding, flags)."""
    G, entry = ours_for(tag, resolution, load=False)
    _, layers, _ = fixture(tag)
    design = layers[str(resolution)]
    theirs = section(entry, "G/")
    for name, buf in G.named_buffers():
        if name.endswith("_filter"):
            torch.testing.assert_close(buf, theirs[name], rtol=0, atol=1e-7, msg=name)
    inp = G.synthesis.input
    assert (inp.channels, [inp.size] * 2) == (design["input"]["channels"], design["input"]["size"])
    assert (inp.sampling_rate, inp.bandwidth) == pytest.approx(
        (design["input"]["sampling_rate"], design["input"]["bandwidth"]), rel=1e-12
    )
    assert G.num_ws == design["num_ws"]
    assert G.synthesis.layer_names == list(design["layers"])
    for name, nv in design["layers"].items():
        layer = getattr(G.synthesis, name)
        ours = {key: getattr(layer, key) for key in nv}
        ours["in_size"], ours["out_size"] = [layer.in_size] * 2, [layer.out_size] * 2
        for key, value in nv.items():
            same = ours[key] == pytest.approx(value, rel=1e-12) if isinstance(value, float) else ours[key] == value
            assert same, f"{name}.{key}: ours {ours[key]}, NVIDIA {value}"
    if resolution == 32:  # the fixtures' num_fp16_res=1 flags only the layers at the full rate
        assert {nv["use_fp16"] for nv in design["layers"].values()} == {False, True}


# ----------------------------------------------------------------------------------------------------------------
# Filter design against the paper


def paper_design(res: int, s: SynthesisConfig, img_channels: int = 3) -> list[dict[str, float]]:
    """Karras et al. 2021, Appendix F, written out independently: per layer i = 0..N the cutoff and minimum
    stopband interpolate geometrically from (f_c0, f_t0) to (res / 2, res / 2 * last_stopband_rel), reached
    num_critical layers before the end; the sampling rate is the smallest power of two >= min(2 f_t, res); the
    transition half-width fills the room up to max(f_t, s / 2)."""
    n = s.num_layers
    fc_last, ft_last = res / 2, res / 2 * s.last_stopband_rel
    rows = []
    for i in range(n + 1):
        t = min(i / (n - s.num_critical), 1.0)
        fc = math.exp((1 - t) * math.log(s.first_cutoff) + t * math.log(fc_last))
        ft = math.exp((1 - t) * math.log(s.first_stopband) + t * math.log(ft_last))
        rate = 1
        while rate < min(2 * ft, res) * (1 - 1e-12):
            rate *= 2
        rows.append(
            {
                "cutoff": fc,
                "stopband": ft,
                "sampling_rate": rate,
                "half_width": max(ft, rate / 2) - fc,
                "size": res if i >= n - 1 else rate + 2 * s.margin_size,
                "channels": img_channels if i == n else round(min(s.channel_base / 2 / fc, s.channel_max)),
                "critically_sampled": i >= n - s.num_critical,
                "use_fp16": rate * 2**s.num_fp16_res > res,
            }
        )
    return rows


def kaiser_lowpass(numtaps: int, cutoff: float, width: float, fs: float, radial: bool) -> np.ndarray:
    """The Kaiser-window design written out: A = 2.285 (n - 1) pi (width / (fs / 2)) + 7.95 dB of attenuation,
    Kaiser's beta(A), ideal low-pass (sinc; jinc when radial) times the window, unit DC gain."""
    a = 2.285 * (numtaps - 1) * math.pi * (width / (fs / 2)) + 7.95
    beta = 0.1102 * (a - 8.7) if a > 50 else 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21) if a > 21 else 0.0
    window = np.i0(beta * np.sqrt(1 - np.linspace(-1, 1, numtaps) ** 2)) / np.i0(beta)
    t = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    if not radial:
        h = 2 * cutoff * np.sinc(2 * cutoff * t) * window
    else:
        import scipy.special

        r = np.hypot(t[:, None], t[None, :])
        h = scipy.special.j1(2 * math.pi * cutoff * r) / (math.pi * r) * np.outer(window, window)
    return h / h.sum()


@pytest.mark.parametrize(
    ("name", "res", "synthesis"),
    [
        ("stylegan3-t 1024", 1024, SynthesisConfig()),
        ("stylegan3-r 512", 512, nvlabs_preset("stylegan3-r").synthesis),
        ("t 256, 3 critical, 10 layers", 256, SynthesisConfig(num_layers=10, num_critical=3, margin_size=4)),
        (
            "fixture r 32",
            32,
            SynthesisConfig(channel_base=256, channel_max=64, conv_kernel=1, use_radial_filters=True, num_fp16_res=1),
        ),
        ("t 16", 16, SynthesisConfig(channel_base=128, channel_max=32)),
    ],
)
def test_filter_design_follows_the_paper(name: str, res: int, synthesis: SynthesisConfig) -> None:
    specs = design_layers(res, 3, synthesis)
    expected = paper_design(res, synthesis)
    assert len(specs) == len(expected) == synthesis.num_layers + 1
    for i, (spec, row) in enumerate(zip(specs, expected, strict=True)):
        for key, value in row.items():
            assert getattr(spec, key) == pytest.approx(value, rel=1e-9), f"{name} layer {i} {key}"
    # The anchors the paper states: f_c0 = 2, f_t0 = 2^2.1, s0 = 16 (so f_h0 = 8 - 2 = 6); the last layers are
    # critically sampled at the output rate with f_c = res / 2.
    assert (specs[0].cutoff, specs[0].sampling_rate) == (synthesis.first_cutoff, 16)
    assert specs[-1].sampling_rate == res and specs[-1].cutoff == pytest.approx(res / 2)
    # Each layer's taps and factors follow from its rates; the filters are the Kaiser designs of the paper (built
    # with 2 channels per layer: channels do not enter the filters).
    narrow = dataclasses.replace(synthesis, channel_base=2 * res, channel_max=2)
    G = Generator(StyleGAN3Config(z_dim=8, w_dim=8, synthesis=narrow), res)
    for layer in G.synthesis.layers():
        torgb = layer.is_torgb
        tmp = max(layer.in_sampling_rate, layer.out_sampling_rate) * (1 if torgb else 2)
        assert (layer.up_factor, layer.down_factor) == (tmp // layer.in_sampling_rate, tmp // layer.out_sampling_rate)
        for which, factor, cutoff, half_width, radial in (
            ("up", layer.up_factor, layer.in_cutoff, layer.in_half_width, False),
            ("down", layer.down_factor, layer.out_cutoff, layer.out_half_width, layer.down_radial),
        ):
            f = getattr(layer, f"{which}_filter")
            if factor == 1 or torgb:
                assert f is None
                continue
            want = kaiser_lowpass(6 * factor, cutoff, 2 * half_width, tmp, radial)
            np.testing.assert_allclose(f.numpy(), want, rtol=0, atol=1e-6, err_msg=f"{which} filter")
            assert f.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_published_configs_match_nvidia_sizes() -> None:
    """NVIDIA's published generators as NVIDIA's code (c233a919) builds them: parameter counts, layer names and
    float16 layers. StyleGAN3-T at 1024 has 22.3M parameters (the paper's figure); the module summary NVIDIA's code
    prints for stylegan3-r-ffhq-1024x1024.pkl totals 15,093,151 parameters and 5,600 buffer elements."""
    expected = {
        ("stylegan3-t", 1024): (22_313_167, 2_480, "36 36 52 52 84 148 148 276 276 532 1044 1044 1044 1024 1024",
                                "512 512 512 512 512 512 512 323 203 128 81 51 32 32 3", 5),
        ("stylegan3-t", 256): (28_472_133, 2_456, "36 36 36 52 52 84 84 148 148 148 276 276 276 256 256",
                               "512 512 512 512 512 512 512 512 512 362 256 181 128 128 3", 3),
        ("stylegan3-r", 1024): (15_093_151, 5_600, "36 36 52 52 84 148 148 276 276 532 1044 1044 1044 1024 1024",
                                "1024 1024 1024 1024 1024 1024 1024 645 406 256 161 102 64 64 3", 5),
        ("stylegan3-r", 512): (16_665_594, 5_588, "36 36 52 52 84 84 148 148 276 276 532 532 532 512 512",
                               "1024 1024 1024 1024 1024 1024 1024 967 645 431 287 192 128 128 3", 4),
    }  # fmt: skip
    for (cfg_name, res), (params, buffer_elems, sizes, channels, first_fp16) in expected.items():
        with torch.device("meta"):
            G = Generator(nvlabs_preset(cfg_name), res)
        assert sum(p.numel() for p in G.parameters()) == params, (cfg_name, res)
        assert sum(b.numel() for b in G.buffers()) == buffer_elems, (cfg_name, res)
        names = [f"L{i}_{s}_{c}" for i, (s, c) in enumerate(zip(sizes.split(), channels.split(), strict=True))]
        assert G.synthesis.layer_names == names
        assert [layer.use_fp16 for layer in G.synthesis.layers()] == [i >= first_fp16 for i in range(15)]


# ----------------------------------------------------------------------------------------------------------------
# Behaviour


def tiny_config(conv_kernel: int = 3, **synthesis: Any) -> StyleGAN3Config:
    kw: dict[str, Any] = {"channel_base": 64, "channel_max": 8, "conv_kernel": conv_kernel}
    kw["use_radial_filters"] = conv_kernel == 1
    return StyleGAN3Config(z_dim=8, w_dim=8, synthesis=SynthesisConfig(**{**kw, **synthesis}))


def test_forward_backward_and_every_parameter_learns() -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.c_dim = 3
    G = Generator(cfg, 16).train()
    z, c = torch.randn(2, 8), torch.eye(3)[[0, 2]]
    img = G(z, c)
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
    (img * torch.randn_like(img)).sum().backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert G.mapping.num_layers == 2 and G.mapping.w_avg_beta == 0.998  # StyleGAN3's mapping defaults


def test_magnitude_ema_is_updated_only_by_training_calls_that_ask() -> None:
    """Inference (eval, or a training-mode call without update_emas) leaves every buffer alone; a training step's
    update_emas=True call sets ema <- lerp(mean(x^2), ema, beta) from each layer's own input, before using it."""
    torch.manual_seed(0)
    beta = magnitude_ema_beta(batch_size=4000)  # 0.5 ** 0.2: one update moves the buffer visibly
    G = Generator(tiny_config(), 16, magnitude_ema_beta=beta)
    z = torch.randn(4, 8)
    before = {k: v.clone() for k, v in G.named_buffers()}
    for mode in ("eval", "train"):
        getattr(G, mode)()
        with torch.no_grad():
            G(z, None)
        assert all(torch.equal(v, before[k]) for k, v in G.named_buffers()), mode

    inputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            inputs[name] = args[0].detach().clone()

        return hook

    hooks = [getattr(G.synthesis, n).register_forward_pre_hook(record(n)) for n in G.synthesis.layer_names]
    G.train()
    with torch.no_grad():
        G(z, None, update_emas=True)
    for h in hooks:
        h.remove()
    for name in G.synthesis.layer_names:
        old = before[f"synthesis.{name}.magnitude_ema"]
        want = inputs[name].square().mean().lerp(old, beta)
        got = getattr(G.synthesis, name).magnitude_ema
        assert not torch.equal(got, old)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=name)
    assert beta == pytest.approx(0.5**0.2) and magnitude_ema_beta(32) == pytest.approx(0.5 ** (32 / 20000))


def test_input_transform_translates_and_rotates_the_fourier_features() -> None:
    """The user transform acts on the sampling grid: a translation by k / s moves the features by k pixels, a 90
    degree rotation rotates them by 90 degrees (the grid is symmetric about the centre)."""
    torch.manual_seed(0)
    inp = SynthesisInput(w_dim=8, channels=6, size=20, sampling_rate=16, bandwidth=2).eval()
    w = torch.randn(3, 8)
    with torch.no_grad():
        inp.affine.weight.normal_()  # per-sample rotation/translation from w, on top of the user's
        base = inp(w)
        inp.transform.copy_(torch.tensor([[1.0, 0, 3 / 16], [0, 1, 0], [0, 0, 1]]))
        shifted = inp(w)
        inp.transform.copy_(torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]))
        rotated = inp(w)
    assert not torch.allclose(base, shifted, atol=1e-3)
    torch.testing.assert_close(shifted[..., :-3], base[..., 3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(rotated, base.flip(-1).transpose(-1, -2), rtol=0, atol=1e-5)


def test_config_validation_and_schema_defaults() -> None:
    cfg = parse_section(StyleGAN3Config, {"synthesis": {"conv_kernel": 1}}, "model")
    assert (cfg.mapping.num_layers, cfg.mapping.w_avg_beta) == (2, 0.998)
    assert (cfg.synthesis.conv_kernel, cfg.synthesis.num_layers, cfg.synthesis.conv_clamp) == (1, 14, 256)
    for key, value in [
        ("num_critical", 14),
        ("first_stopband", 1.5),
        ("last_stopband_rel", 1.0),
        ("conv_kernel", 0),
        ("num_fp16_res", -1),
    ]:
        with pytest.raises(ConfigError, match=rf"model\.synthesis\.{key}="):
            parse_section(StyleGAN3Config, {"synthesis": {key: value}}, "model")
    with pytest.raises(ValueError, match="cfg must be one of"):
        nvlabs_preset("stylegan3-x")  # type: ignore[arg-type]
    r = nvlabs_preset("stylegan3-r", channel_base=16384, channel_max=256)
    assert (r.synthesis.channel_base, r.synthesis.channel_max, r.synthesis.conv_kernel) == (32768, 512, 1)
    assert r.synthesis.use_radial_filters
    assert (r.discriminator.channel_base, r.discriminator.channel_max) == (16384, 256)


def test_stylegan2_discriminator_builds_from_the_stylegan3_config() -> None:
    cfg = tiny_config()
    cfg.c_dim = 2
    cfg.discriminator = stylegan2.DiscriminatorConfig(channel_base=64, channel_max=8)
    G, D = Generator(cfg, 16), stylegan2.Discriminator(cfg, 16)
    c = torch.eye(2)[[0, 1]]
    assert D(G(torch.randn(2, 8), c), c).shape == (2, 1)


@pytest.mark.parametrize("conv_kernel", [3, 1])
def test_triton_filtered_lrelu_matches_the_reference_in_the_synthesis(
    conv_kernel: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole synthesis network (3 layers + toRGB at 16 px, 2 of them non-critical: radial filters for R) with
    every op on the Triton kernels (interpreted on CPU) gives the reference's image and gradients."""
    reason = triton_unavailable_reason(torch.empty(1))
    if reason is not None:
        pytest.skip(f"Triton cannot run here: {reason}")
    torch.manual_seed(0)
    cfg = tiny_config(conv_kernel, channel_base=32, channel_max=4, num_layers=3, num_critical=1, margin_size=2)
    G = Generator(cfg, 16).train()
    with torch.no_grad():
        for name, buf in G.named_buffers():
            if name.endswith("magnitude_ema"):
                buf.uniform_(0.5, 2)
        for name, p in G.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ws = G.mapping(torch.randn(2, 8), None).detach()
    upstream = torch.randn(2, 3, 16, 16)
    results = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("GANPIPE_OPS_IMPL", impl)
        G.zero_grad()
        ws_ = ws.clone().requires_grad_(True)
        img = G.synthesis(ws_)
        (img * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in G.synthesis.named_parameters()}
        results[impl] = (img.detach(), ws_.grad, grads)
    (img_ref, gws_ref, g_ref), (img_tri, gws_tri, g_tri) = results["ref"], results["triton"]
    torch.testing.assert_close(img_tri, img_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gws_tri, gws_ref, rtol=1e-4, atol=1e-5 * gws_ref.abs().max().item())
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_tri[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)
