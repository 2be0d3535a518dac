"""The StyleGAN sampler behind `ganpipe generate`, grids and metrics: truncation (global and per class), noise
modes, style mixing, interpolation; and the options and requests it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.errors import SamplingError
from pipeline.export import ExportedGenerator, write_export
from pipeline.families import get_family
from pipeline.models.conditioning import Request
from pipeline.models.sampling import seed_latents, slerp
from pipeline.models.stylegan_sampling import StyleGANOptions, StyleGANSampler

RES = 8


def tiny_sampler(c_dim: int) -> StyleGANSampler:
    model = {
        "z_dim": 8,
        "w_dim": 8,
        "c_dim": c_dim,
        "mapping": {"num_layers": 2},
        "synthesis": {"channel_base": 64, "channel_max": 16},
        "discriminator": {"channel_base": 64, "channel_max": 16},
    }
    family = get_family("stylegan2")
    spec = family.spec(model, RES)
    torch.manual_seed(0)
    G = family.build_generator(spec)
    with torch.no_grad():  # trained-looking values: visible noise and a w_avg away from zero
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
        G.mapping.w_avg.copy_(torch.randn(8))
    sampler = family.make_sampler(G.eval().requires_grad_(False), family.build_conditioning(spec))
    assert isinstance(sampler, StyleGANSampler)
    sampler.export_model = model  # what generator.json records, for the CLI tests
    return sampler


@pytest.fixture(scope="module")
def S_uncond():
    return tiny_sampler(0)


@pytest.fixture(scope="module")
def S_cond():
    return tiny_sampler(3)


def onehot(class_idx: int, n: int) -> torch.Tensor:
    c = torch.zeros(n, 3)
    c[:, class_idx] = 1
    return c


def test_global_truncation_matches_the_generators_own(S_uncond) -> None:
    seeds, G = [0, 1, 2], S_uncond.G
    z = seed_latents(seeds, 8)
    for psi in (1.0, 0.5):
        ours = S_uncond.generate(seeds, options=StyleGANOptions(truncation_psi=psi))
        torch.testing.assert_close(ours, G(z, None, truncation_psi=psi, noise_mode="const"))


def test_seed_latents_are_nvidias() -> None:
    import numpy as np

    torch.testing.assert_close(seed_latents([7], 5)[0], torch.from_numpy(np.random.RandomState(7).randn(5)).float())


def test_class_conditional_truncation_pulls_toward_the_class_average(S_cond) -> None:
    G, one = S_cond.G, Request(class_idx=1)
    center = S_cond.class_w_avg(one, num_samples=2000)
    z = seed_latents(list(range(2000)), 8)  # a different sample estimates the same mean closely
    torch.testing.assert_close(center, G.mapping(z, onehot(1, 2000))[:, 0].mean(0), atol=0.05, rtol=0)
    other = S_cond.class_w_avg(Request(class_idx=2), num_samples=2000)
    assert (center - other).norm() > 0.1 and (center - G.mapping.w_avg).norm() > 0.1

    # psi = 0 collapses every seed onto the class center; psi = 1 is untouched.
    psi0 = StyleGANOptions(truncation_psi=0.0, class_avg_samples=2000)
    images = S_cond.generate([3, 4, 5], one, psi0)
    expected = S_cond.synthesize_ws(center.expand(1, G.num_ws, 8))
    for image in images:
        torch.testing.assert_close(image, expected[0])
    psi_half = S_cond.generate([3], one, StyleGANOptions(truncation_psi=0.5, class_avg_samples=2000))
    ws = G.mapping(seed_latents([3], 8), onehot(1, 1))
    torch.testing.assert_close(psi_half, S_cond.synthesize_ws(center + 0.5 * (ws - center)))
    # The global center reproduces the generator's built-in truncation.
    glob = S_cond.generate([3], one, StyleGANOptions(truncation_psi=0.5, truncation_center="global"))
    torch.testing.assert_close(glob, G(seed_latents([3], 8), onehot(1, 1), 0.5, noise_mode="const"))
    with pytest.raises(SamplingError, match="class-conditional"):
        S_cond.generate([0])
    with pytest.raises(SamplingError, match="out of range"):
        S_cond.generate([0], Request(class_idx=3))
    with pytest.raises(SamplingError, match="drop --prompt"):
        S_cond.generate([0], Request(class_idx=1, prompt="a red circle"))


def test_noise_modes(S_uncond) -> None:
    def run(mode: str, noise_seed: int = 0) -> torch.Tensor:
        return S_uncond.generate([7, 8], options=StyleGANOptions(noise_mode=mode, noise_seed=noise_seed))

    assert torch.equal(run("const"), run("const"))
    assert torch.equal(run("random", 1), run("random", 1))  # reproducible from the noise seed
    assert not torch.allclose(run("random", 1), run("random", 2))
    assert not torch.allclose(run("random", 1), run("const"))
    assert not torch.allclose(run("none"), run("const"))
    assert torch.equal(run("none"), run("none"))
    with pytest.raises(SamplingError, match="--noise-mode loud is invalid"):
        run("loud")


def test_style_mixing_grid(S_uncond) -> None:
    rows, cols, layers = [1, 2], [3, 4, 5], [0, 1]
    psi = StyleGANOptions(truncation_psi=0.7)
    images, grid = S_uncond.style_mix_grid(rows, cols, layers, options=psi)
    assert grid == (3, 4) and images.shape == (12, 3, RES, RES)
    assert torch.equal(images[0], torch.full_like(images[0], -1))  # blank corner
    own = S_uncond.generate([*cols, *rows], options=psi)
    torch.testing.assert_close(images[1:4], own[:3])  # header row: the column seeds
    torch.testing.assert_close(images[4], own[3])  # header column: row seed 1
    w = S_uncond.mapper(Request(), psi)(seed_latents([2, 5], 8))
    mixed = w[0].clone()
    mixed[layers] = w[1][layers]
    torch.testing.assert_close(images[11], S_uncond.synthesize_ws(mixed[None])[0])  # row seed 2 x column seed 5
    all_from_cols, _ = S_uncond.style_mix_grid([1], [3], list(range(S_uncond.G.num_ws)))
    torch.testing.assert_close(all_from_cols[3], all_from_cols[1])  # every style from the column = column image
    with pytest.raises(SamplingError, match="out of range"):
        S_uncond.style_mix_grid(rows, cols, [S_uncond.G.num_ws])


@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolation_frames(S_uncond, space: str) -> None:
    seeds, psi = [0, 5, 9], StyleGANOptions(truncation_psi=0.8)
    frames = torch.cat(list(S_uncond.interpolation_frames(seeds, 4, space, options=psi, batch_size=5)))
    assert frames.shape[0] == (len(seeds) - 1) * 4 + 1
    ends = S_uncond.generate(seeds, options=psi)
    for frame_idx, seed_idx in ((0, 0), (4, 1), (8, 2)):
        torch.testing.assert_close(frames[frame_idx], ends[seed_idx], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(frames[1], frames[0]) and not torch.allclose(frames[1], frames[4])
    with pytest.raises(SamplingError, match="at least two"):
        next(S_uncond.interpolation_frames([1], 4))


def test_slerp_keeps_the_norm_between_equal_norm_latents() -> None:
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    mid = slerp(a, b, torch.tensor([0.5]))
    torch.testing.assert_close(mid.norm(dim=1), torch.tensor([3.0]))
    torch.testing.assert_close(slerp(a, a, torch.tensor([0.3])), a)  # parallel: falls back to lerp


def test_cli_style_mix_and_interpolate(S_cond, tmp_path: Path, capsys) -> None:
    export = tmp_path / "export"
    write_export(
        str(export), ExportedGenerator("stylegan2", S_cond.export_model, RES), {"G_ema": S_cond.G.state_dict()}
    )
    run = ["generate", str(export), "--class", "2", "--class-avg-samples", "500", "--device", "cpu"]
    grid = tmp_path / "mix.png"
    assert main([*run, "--style-mix", "1,2", "3-5", "--style-layers", "0-2", "--trunc", "0.7", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (4 * RES, 3 * RES)
    frames = tmp_path / "frames"
    argv = [*run, "--interpolate", "0,1,2", "--frames", "3", "--interp-space", "z", "--noise-mode", "none"]
    assert main([*argv, "--outdir", str(frames)]) == 0
    assert sorted(p.name for p in frames.iterdir()) == [f"frame{i:06d}.png" for i in range(7)]
    capsys.readouterr()
    assert main([*run, "--style-mix", "1", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ganpipe: error:") and "--out" in err
    assert main(["generate", str(export), "--prompt", "a red circle", "--out", str(grid)]) == 2
    assert "--prompt is not available: this stylegan2 generator is class-conditional" in capsys.readouterr().err
    # `generate EXPORT --help` lists what a StyleGAN generator takes.
    assert main(["generate", str(export), "--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--trunc", "--noise-mode", "--style-mix", "--interp-space {w,z}"))
