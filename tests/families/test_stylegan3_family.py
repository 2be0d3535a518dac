"""The StyleGAN3 family through the engine: the blur on D's inputs against its formula and NVIDIA's schedule, the
magnitude EMAs trained and resumed exactly, the recipes' published values, and train -> export -> generate with
the input transform (`--translate`, `--rotate`, `--motion`) checked against pixel shifts and rotations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.signal
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.checkpoint import list_checkpoints, load_checkpoint
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import SamplingError
from pipeline.export import ExportedGenerator, write_export
from pipeline.families import get_family
from pipeline.models import stylegan2, stylegan3
from pipeline.models.stylegan_sampling import StyleGAN3Options
from pipeline.objectives import Networks, Phase, PhaseInputs
from pipeline.objectives.stylegan2 import StyleGAN2LossConfig, StyleGAN2Objective, gaussian_blur
from pipeline.schema import section_dict
from pipeline.train import train
from tests.conftest import REPO

RECIPES = REPO / "recipes" / "stylegan3"
FAST = [
    "data.batch_size=4",
    "data.synth.n=64",
    "data.resolution=16",
    "model.z_dim=8",
    "model.w_dim=8",
    "model.synthesis.num_layers=4",
    "model.synthesis.channel_base=128",
    "model.synthesis.channel_max=8",
    "model.discriminator.channel_base=64",
    "model.discriminator.channel_max=8",
    "model.discriminator.mbstd_group_size=2",
    "train.progress_bar=false",
    "logger.csv=false",
    "eval.metrics=[]",
]


def _config(tmp_path: Path, *overrides: str, run: str = "run") -> Any:
    base = [f"run_dir={tmp_path / run}", f"data.cache_dir={tmp_path / 'cache'}", *FAST]
    return load_config(str(RECIPES / "tiny.yaml"), [*base, *overrides])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return float(20 * np.log10(2) - 10 * np.log10(np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------------------------------------------
# Blur on D's inputs


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_blur_is_nvidias_filter_against_a_direct_convolution(sigma: float) -> None:
    """taps exp2(-(k / sigma)^2) for |k| <= floor(3 sigma), normalised, applied along x and y with zero padding."""
    img = torch.randn(2, 3, 17, 19, dtype=torch.float64).float()
    radius = int(np.floor(3 * sigma))
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = 2.0 ** (-((k / sigma) ** 2))
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    expected = np.stack(
        [[scipy.signal.convolve2d(ch, kernel, mode="same") for ch in im] for im in img.double().numpy()]
    )
    np.testing.assert_allclose(gaussian_blur(img, sigma).numpy(), expected, atol=1e-5)
    assert gaussian_blur(img, 0.3) is img  # floor(3 * 0.3) = 0 taps each side: no blur


def test_blur_fades_linearly_over_nvidias_default() -> None:
    obj = StyleGAN2Objective(StyleGAN2LossConfig(blur_init_sigma=10), batch_size=64)
    assert obj.blur_fade_kimg == 400  # batch * 200 / 32
    assert [obj.blur_sigma(n) for n in (0, 100_000, 200_000, 400_000, 10**7)] == [10, 7.5, 5, 0, 0]
    fixed = StyleGAN2Objective(StyleGAN2LossConfig(blur_init_sigma=4, blur_fade_kimg=10), batch_size=64)
    assert fixed.blur_sigma(5000) == 2
    assert StyleGAN2Objective(StyleGAN2LossConfig(), batch_size=64).blur_sigma(0) == 0  # StyleGAN2: no blur


class RecordingD(nn.Module):
    """D(x) = mean of x times a learned scale; remembers what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.seen: list[Tensor] = []

    def forward(self, img: Tensor, c: Tensor | None, force_fp32: bool = False) -> Tensor:
        self.seen.append(img.detach().clone())
        return img.mean(dim=(1, 2, 3)) * self.scale


class ConstG(nn.Module):
    """A generator whose images are a fixed random pattern per latent row (mapping/synthesis as StyleGAN's)."""

    def __init__(self) -> None:
        super().__init__()
        self.pattern = nn.Parameter(torch.randn(1, 1, 12, 12))
        self.mapping = lambda z, c, update_emas=False: z[:, None, :].expand(-1, 2, -1)

    def synthesis(self, ws: Tensor, force_fp32: bool = False, update_emas: bool = False) -> Tensor:
        return self.pattern * ws[:, :1, :1, None]


def test_d_sees_blurred_fakes_and_reals_and_r1_differentiates_the_unblurred_reals() -> None:
    cfg = StyleGAN2LossConfig(blur_init_sigma=2, blur_fade_kimg=1, r1_gamma=1, style_mixing_prob=0)
    obj = StyleGAN2Objective(cfg, batch_size=4)
    G, D = ConstG(), RecordingD()
    real = torch.randn(4, 1, 12, 12)
    inputs = PhaseInputs(real_img=real, real_c=None, gen_z=torch.randn(4, 3), gen_c=None, cur_nimg=500)
    sigma = obj.blur_sigma(500)
    assert sigma == 1
    obj.phase_loss(Phase("Dmain", "D"), Networks(G, D), inputs)
    fake = G.synthesis(G.mapping(inputs.gen_z, None)).detach()
    torch.testing.assert_close(D.seen[0], gaussian_blur(fake, sigma))
    torch.testing.assert_close(D.seen[1], gaussian_blur(real, sigma))
    assert not torch.allclose(D.seen[1], real, atol=1e-2)

    # R1 = |d D(blur(x)) / dx|^2 on the unblurred reals; D is linear, so the gradient is blur^T of a constant.
    loss, stats = obj.phase_loss(Phase("Dreg", "D", 16, double_backward=True), Networks(G, D), inputs)
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((gaussian_blur(x, sigma).mean(dim=(1, 2, 3)) * D.scale).sum(), x)
    penalty = grad.square().sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(stats["Loss/r1_penalty"], penalty)
    torch.testing.assert_close(loss, penalty * (cfg.r1_gamma / 2) * 16)  # lazy: scaled by the interval
    late = PhaseInputs(real_img=real, real_c=None, gen_z=inputs.gen_z, gen_c=None, cur_nimg=1000)
    D.seen.clear()
    obj.phase_loss(Phase("Gmain", "G"), Networks(G, D), late)
    torch.testing.assert_close(D.seen[0], G.synthesis(G.mapping(late.gen_z, None)).detach())  # faded out


# ----------------------------------------------------------------------------------------------------------------
# The record, the recipes


def test_the_record_builds_nvidias_networks_with_the_batch_derived_magnitude_ema() -> None:
    family = get_family("stylegan3")
    cfg = load_config(str(RECIPES / "afhqv2-512-r.yaml"))
    G = family.build_generator(family.spec(cfg.model, 64, cfg))  # shapes follow the recipe; 64 px keeps it small
    layers = G.synthesis.layers()
    assert all(layer.magnitude_ema_beta == 0.5 ** (32 / 20_000) for layer in layers)
    assert isinstance(family.build_discriminator(family.spec(cfg.model, 64)), stylegan2.Discriminator)
    rebuilt = family.build_generator(family.spec(cfg.model, 64))  # from an export: no training config
    assert rebuilt.synthesis.layers()[0].magnitude_ema_beta == stylegan3.DEFAULT_MAGNITUDE_EMA_BETA
    objective = family.build_objective(cfg)
    assert objective.blur_fade_kimg == 200 and objective.blur_sigma(0) == 10
    assert [p.name for p in objective.phases()] == ["Gmain", "Dmain", "Dreg"]  # no path length, lazy R1


def test_recipes_hold_nvidias_values() -> None:
    t = load_config(str(RECIPES / "afhqv2-512-t.yaml"))
    assert (t.family, t.data.resolution, t.data.batch_size, t.data.xflip, t.loss.r1_gamma) == (
        "stylegan3", 512, 32, True, 8.2)  # fmt: skip
    assert (t.optim.g_lr, t.optim.d_lr, t.optim.betas, t.optim.eps) == (0.0025, 0.002, (0.0, 0.99), 1e-8)
    assert (t.loss.pl_weight, t.loss.style_mixing_prob, t.loss.blur_init_sigma, t.loss.d_reg_interval) == (0, 0, 0, 16)
    assert (t.model.mapping.num_layers, t.model.synthesis.conv_kernel, t.model.synthesis.channel_base) == (2, 3, 32768)
    assert (t.model.synthesis.num_fp16_res, t.model.synthesis.conv_clamp, t.train.ema_rampup) == (4, 256, 0.05)
    assert t.train.ema_kimg is None and t.augment.kind == "ada" and t.augment.target == 0.6  # ema: batch * 10 / 32
    r = load_config(str(RECIPES / "afhqv2-512-r.yaml"))
    assert (r.model.synthesis.conv_kernel, r.model.synthesis.use_radial_filters) == (1, True)
    assert (r.model.synthesis.channel_base, r.model.synthesis.channel_max) == (65536, 1024)
    assert (r.model.discriminator.channel_base, r.model.discriminator.channel_max) == (32768, 512)
    assert (r.loss.r1_gamma, r.loss.blur_init_sigma, r.loss.blur_fade_kimg) == (16.4, 10, None)
    a = load_config(str(RECIPES / "ffhqu-256-r.yaml"))
    assert (a.data.batch_size, a.optim.d_lr, a.augment.kind, a.loss.r1_gamma) == (64, 0.0025, "none", 1)
    assert (a.model.synthesis.channel_base, a.model.discriminator.channel_base) == (32768, 16384)
    assert get_family("stylegan3").build_objective(a).blur_fade_kimg == 400
    m = load_config(str(RECIPES / "metfacesu-1024-r.yaml"))
    assert m.init is not None and m.init.endswith("stylegan3-r-ffhqu-1024x1024.pkl")
    assert (m.loss.r1_gamma, m.loss.blur_init_sigma, m.train.ema_rampup, m.augment.ada_kimg) == (6.6, 0, None, 100)
    assert m.train.total_kimg == 5000


# ----------------------------------------------------------------------------------------------------------------
# Training


def test_trains_updates_the_magnitude_emas_and_resumes_exactly(tmp_path: Path) -> None:
    settings = ["loss.blur_init_sigma=2", "train.checkpoint_every_kimg=0.008", "train.samples_every_kimg=1"]
    full = _config(tmp_path, *settings, "train.total_kimg=0.016", run="full")
    train(full)
    expected = load_checkpoint(list_checkpoints(full.run_dir)[-1])
    assert expected["counters"]["cur_nimg"] == 16
    emas = {k: v for k, v in expected["G"].items() if k.endswith("magnitude_ema")}
    assert emas and all(v.item() != 1.0 for v in emas.values())  # every layer's EMA moved off its initial 1
    for key, value in emas.items():  # G_ema carries G's buffers
        assert torch.equal(expected["G_ema"][key], value)
    assert all(torch.isfinite(v).all() for net in ("G", "D") for v in expected[net].values())

    train(_config(tmp_path, *settings, "train.total_kimg=0.008", run="split"))
    second = _config(tmp_path, *settings, "train.total_kimg=0.016", run="split")
    train(second, resume="auto")
    resumed = load_checkpoint(list_checkpoints(second.run_dir)[-1])
    assert resumed["counters"] == expected["counters"]
    for net in ("G", "D", "G_ema"):
        for key, value in expected[net].items():
            assert torch.equal(resumed[net][key], value), f"{net}.{key}"


# ----------------------------------------------------------------------------------------------------------------
# Sampling with the input transform


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float64) / 127.5 - 1


def test_translate_rotate_and_motion_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An untrained StyleGAN3-R is equivariant to integer shifts and to 90 degree turns (a check of our sign
    conventions against pixel operations: x right, y down, counter-clockwise), the stored transform comes back."""
    cfg = _config(
        tmp_path,
        "data.resolution=32",
        "model.synthesis.num_layers=6",
        "model.synthesis.channel_base=256",
        "model.synthesis.channel_max=16",
        "model.synthesis.conv_kernel=1",
        "model.synthesis.use_radial_filters=true",
        "train.total_kimg=0.004",
        "train.samples_every_kimg=1",
    )
    train(cfg)
    export = tmp_path / "export"
    # the ONNX graph is verified at batch sizes 4 and 1 by the export itself (a batch-pinning op would fail here)
    assert main(["export", str(cfg.run_dir), "--out", str(export), "--format", "safetensors,onnx"]) == 0

    def draw(*flags: str) -> np.ndarray:
        out = tmp_path / f"img{len(list(tmp_path.glob('img*')))}"
        assert main(["generate", str(export), "--seeds", "3", "--outdir", str(out), *flags]) == 0
        return _png(out / "seed0003.png")

    plain = draw()
    inner = (slice(6, -6), slice(6, -6))  # away from the borders, where shifted-in content differs

    def matches(moved: np.ndarray, expected: np.ndarray, *others: np.ndarray) -> bool:
        """`moved` is `expected` up to 8-bit rounding, and clearly not any of `others`."""
        score = psnr(moved[inner], expected[inner])
        return score > 50 and all(score - psnr(moved[inner], other[inner]) > 15 for other in others)

    right = draw("--translate", "0.125,0")  # 4 px
    assert matches(right, np.roll(plain, 4, axis=1), np.roll(plain, -4, axis=1), plain)
    down = draw("--translate", "0,0.125")
    assert matches(down, np.roll(plain, 4, axis=0), np.roll(plain, -4, axis=0), plain)
    turned = draw("--rotate", "90")
    assert matches(turned, np.rot90(plain, 1), np.rot90(plain, -1), plain)
    np.testing.assert_array_equal(draw(), plain)  # the stored transform was restored
    walk = tmp_path / "walk"  # latent walks move too (every sampler method draws through synthesize_ws)
    assert main(["generate", str(export), "--interpolate", "3,4", "--frames", "2", "--translate", "0.125,0",
                 "--outdir", str(walk)]) == 0  # fmt: skip
    np.testing.assert_array_equal(_png(sorted(walk.glob("*.png"))[0]), right)

    frames = tmp_path / "motion"
    assert main(["generate", str(export), "--seeds", "3", "--motion", "5", "--translate", "0.125,0",
                 "--outdir", str(frames)]) == 0  # fmt: skip
    pngs = sorted(frames.glob("*.png"))
    assert len(pngs) == 5
    np.testing.assert_array_equal(_png(pngs[0]), plain)
    np.testing.assert_array_equal(_png(pngs[-1]), right)
    assert matches(_png(pngs[2]), np.roll(plain, 2, axis=1), plain, right)  # 2 px: halfway

    graph = tmp_path / "graph"
    assert main(["generate", str(export), "--runtime", "onnxruntime", "--seeds", "3", "--outdir", str(graph)]) == 0
    assert np.abs(_png(graph / "seed0003.png") - plain).max() <= 1 / 127.5 + 1e-9  # one 8-bit level
    capsys.readouterr()
    assert main(["generate", str(export), "--runtime", "onnxruntime", "--translate", "0.1,0", "--out",
                 str(tmp_path / "g.png")]) != 0  # fmt: skip
    assert "--translate is not available with --runtime onnxruntime" in capsys.readouterr().err
    assert main(["generate", str(export), "--seeds", "3", "--motion", "5", "--outdir", str(frames)]) != 0
    assert "--translate" in capsys.readouterr().err
    assert main(["generate", str(export), "--seeds", "1,2", "--motion", "5", "--rotate", "9", "--outdir",
                 str(frames)]) != 0  # fmt: skip
    assert "one seed" in capsys.readouterr().err
    assert main(["generate", str(export), "--translate", "1", "--out", str(tmp_path / "x.png")]) != 0
    assert "--translate '1' is invalid" in capsys.readouterr().err


def test_options_are_refused_where_they_cannot_apply() -> None:
    with pytest.raises(SamplingError, match="--translate 'a,b' is invalid"):
        StyleGAN3Options(translate="a,b")
    with pytest.raises(SamplingError, match="--rotate inf is invalid"):
        StyleGAN3Options(rotate=float("inf"))
    sampler_cls = get_family("stylegan3").sampler
    from pipeline.models.conditioning import Request

    assert "--runtime torch" in sampler_cls.graph_unavailable(StyleGAN3Options(rotate=5.0), Request())
    assert sampler_cls.graph_unavailable(StyleGAN3Options(), Request()) is None
    assert not get_family("stylegan2").sampler.can_move


def test_only_the_d_steps_generator_pass_updates_the_magnitude_emas() -> None:
    """NVIDIA's loss: G runs with update_emas=True only when it draws D's fakes (Dmain/Dboth); the first layer's
    EMA then becomes lerp(mean(x^2), ema, beta) of the Fourier features it was fed."""
    cfg = load_config(str(RECIPES / "tiny.yaml"), FAST)
    family = get_family("stylegan3")
    spec = family.spec(cfg.model, cfg.data.resolution, cfg)
    G, D = family.build_generator(spec), family.build_discriminator(spec)
    objective = family.build_objective(cfg)
    first = G.synthesis.layers()[0]
    beta = first.magnitude_ema_beta
    torch.manual_seed(0)
    inputs = PhaseInputs(real_img=torch.randn(4, 3, 16, 16), real_c=None, gen_z=torch.randn(4, 8), gen_c=None)

    def emas() -> list[Tensor]:
        return [layer.magnitude_ema.clone() for layer in G.synthesis.layers()]

    before = emas()
    for phase in (Phase("Gmain", "G"), Phase("Dreg", "D", 16, double_backward=True)):
        objective.phase_loss(phase, Networks(G, D), inputs)
        assert all(torch.equal(a, b) for a, b in zip(emas(), before, strict=True)), phase.name
    objective.phase_loss(Phase("Dmain", "D"), Networks(G, D), inputs)
    after = emas()
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with torch.no_grad():
        x = G.synthesis.input(G.mapping(inputs.gen_z, None)[:, 0])
    torch.testing.assert_close(after[0], x.square().mean().lerp(before[0], beta))


def test_motion_restores_the_transform_between_frames_and_conflicting_flags_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    family = get_family("stylegan3")
    spec = family.spec(load_config(str(RECIPES / "tiny.yaml"), FAST).model, 16)
    G = family.build_generator(spec).eval()
    stored = stylegan3.image_transform((0.1, 0.0), 5.0)
    G.synthesis.input.transform.copy_(stored)
    sampler = family.make_sampler(G, family.build_conditioning(spec))
    frames = sampler.motion_frames(0, 4, options=StyleGAN3Options(rotate=30.0))
    next(frames)
    next(frames)  # the caller holds a frame: G is back to its own transform
    assert torch.equal(G.synthesis.input.transform, stored)
    frames.close()
    export = tmp_path / "export"
    write_export(str(export), ExportedGenerator("stylegan3", section_dict(spec.model), 16), {"G_ema": G.state_dict()})
    for extra in (["--out", str(tmp_path / "g.png")], ["--interpolate", "0,1"]):
        capsys.readouterr()
        assert main(["generate", str(export), "--motion", "3", "--rotate", "9", "--outdir", str(tmp_path), *extra]) != 0
        assert f"--motion writes one PNG per frame into --outdir: drop {extra[0]}" in capsys.readouterr().err
