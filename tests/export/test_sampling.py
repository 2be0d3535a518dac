"""`ganpipe generate` sampling: truncation (global and per class), noise modes, style mixing, interpolation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.export import ExportedGenerator, write_export
from pipeline.export import generate as gen
from pipeline.models import get_family

RES = 8


def tiny_generator(c_dim: int) -> torch.nn.Module:
    model = {
        "z_dim": 8,
        "w_dim": 8,
        "c_dim": c_dim,
        "mapping": {"num_layers": 2},
        "synthesis": {"channel_base": 64, "channel_max": 16},
        "discriminator": {"channel_base": 64, "channel_max": 16},
    }
    cfg = config_from_dict({"family": "stylegan2", "model": model, "data": {"resolution": RES}})
    torch.manual_seed(0)
    G = get_family("stylegan2").build_generator(cfg.model, RES)
    with torch.no_grad():  # trained-looking values: visible noise and a w_avg away from zero
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
        G.mapping.w_avg.copy_(torch.randn(8))
    G.export_model = cfg.to_dict()["model"]  # what generator.json records, for the CLI tests
    return G.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def G_uncond():
    return tiny_generator(0)


@pytest.fixture(scope="module")
def G_cond():
    return tiny_generator(3)


def test_global_truncation_matches_the_generators_own(G_uncond) -> None:
    seeds = [0, 1, 2]
    z = gen.seed_latents(seeds, 8)
    for psi in (1.0, 0.5):
        ours = gen.generate_images(G_uncond, seeds, truncation_psi=psi)
        torch.testing.assert_close(ours, G_uncond(z, None, truncation_psi=psi, noise_mode="const"))


def test_class_conditional_truncation_pulls_toward_the_class_average(G_cond) -> None:
    center = gen.class_w_avg(G_cond, 1, num_samples=2000)
    z = gen.seed_latents(list(range(2000)), 8)  # a different sample estimates the same mean closely
    c = gen.class_labels(G_cond, 1, 2000)
    torch.testing.assert_close(center, G_cond.mapping(z, c)[:, 0].mean(0), atol=0.05, rtol=0)
    other = gen.class_w_avg(G_cond, 2, num_samples=2000)
    assert (center - other).norm() > 0.1 and (center - G_cond.mapping.w_avg).norm() > 0.1

    # psi = 0 collapses every seed onto the class center; psi = 1 is untouched.
    images = gen.generate_images(G_cond, [3, 4, 5], truncation_psi=0.0, class_idx=1, class_avg_samples=2000)
    expected = gen.synthesize(G_cond, center.expand(1, G_cond.num_ws, 8))
    for image in images:
        torch.testing.assert_close(image, expected[0])
    psi_half = gen.generate_images(G_cond, [3], truncation_psi=0.5, class_idx=1, class_avg_samples=2000)
    ws = G_cond.mapping(gen.seed_latents([3], 8), gen.class_labels(G_cond, 1, 1))
    torch.testing.assert_close(psi_half, gen.synthesize(G_cond, center + 0.5 * (ws - center)))
    # The global center reproduces the generator's built-in truncation.
    glob = gen.generate_images(G_cond, [3], truncation_psi=0.5, class_idx=1, truncation_center="global")
    torch.testing.assert_close(
        glob, G_cond(gen.seed_latents([3], 8), gen.class_labels(G_cond, 1, 1), 0.5, noise_mode="const")
    )
    with pytest.raises(gen.SeedsError, match="class-conditional"):
        gen.generate_images(G_cond, [0])
    with pytest.raises(gen.SeedsError, match="out of range"):
        gen.generate_images(G_cond, [0], class_idx=3)


def test_noise_modes(G_uncond) -> None:
    def run(mode: str, noise_seed: int = 0) -> torch.Tensor:
        return gen.generate_images(G_uncond, [7, 8], noise_mode=mode, noise_seed=noise_seed)

    assert torch.equal(run("const"), run("const"))
    assert torch.equal(run("random", 1), run("random", 1))  # reproducible from the noise seed
    assert not torch.allclose(run("random", 1), run("random", 2))
    assert not torch.allclose(run("random", 1), run("const"))
    assert not torch.allclose(run("none"), run("const"))
    assert torch.equal(run("none"), run("none"))


def test_style_mixing_grid(G_uncond) -> None:
    rows, cols, layers = [1, 2], [3, 4, 5], [0, 1]
    images, grid = gen.style_mix_grid(G_uncond, rows, cols, layers, truncation_psi=0.7)
    assert grid == (3, 4) and images.shape == (12, 3, RES, RES)
    assert torch.equal(images[0], torch.full_like(images[0], -1))  # blank corner
    own = gen.generate_images(G_uncond, [*cols, *rows], truncation_psi=0.7)
    torch.testing.assert_close(images[1:4], own[:3])  # header row: the column seeds
    torch.testing.assert_close(images[4], own[3])  # header column: row seed 1
    w = gen._Mapper(G_uncond, 0.7, None, "class", 1)(gen.seed_latents([2, 5], 8))
    mixed = w[0].clone()
    mixed[layers] = w[1][layers]
    torch.testing.assert_close(images[11], gen.synthesize(G_uncond, mixed[None])[0])  # row seed 2 x column seed 5
    all_from_cols, _ = gen.style_mix_grid(G_uncond, [1], [3], list(range(G_uncond.num_ws)))
    torch.testing.assert_close(all_from_cols[3], all_from_cols[1])  # every style from the column = column image
    with pytest.raises(gen.SeedsError, match="out of range"):
        gen.style_mix_grid(G_uncond, rows, cols, [G_uncond.num_ws])


@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolation_frames(G_uncond, space: str) -> None:
    seeds = [0, 5, 9]
    frames = torch.cat(
        list(gen.interpolation_frames(G_uncond, seeds, 4, space=space, truncation_psi=0.8, batch_size=5))
    )
    assert frames.shape[0] == (len(seeds) - 1) * 4 + 1
    ends = gen.generate_images(G_uncond, seeds, truncation_psi=0.8)
    for frame_idx, seed_idx in ((0, 0), (4, 1), (8, 2)):
        torch.testing.assert_close(frames[frame_idx], ends[seed_idx], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(frames[1], frames[0]) and not torch.allclose(frames[1], frames[4])
    with pytest.raises(gen.SeedsError, match="at least two"):
        next(gen.interpolation_frames(G_uncond, [1], 4))


def test_slerp_keeps_the_norm_between_equal_norm_latents() -> None:
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    mid = gen.slerp(a, b, torch.tensor([0.5]))
    torch.testing.assert_close(mid.norm(dim=1), torch.tensor([3.0]))
    torch.testing.assert_close(gen.slerp(a, a, torch.tensor([0.3])), a)  # parallel: falls back to lerp


def test_cli_style_mix_and_interpolate(G_cond, tmp_path: Path, capsys) -> None:
    export = tmp_path / "export"
    meta = ExportedGenerator("stylegan2", G_cond.export_model, RES, 8, 3, 3, 0.0, None)
    write_export(str(export), meta, {"G_ema": G_cond.state_dict()})
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
