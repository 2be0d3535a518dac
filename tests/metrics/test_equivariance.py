"""NVIDIA's equivariance metrics (eqtN_int, eqtN_frac, eqrN): oracles from toy generators whose equivariance is
known by construction, NVIDIA's own metric code on the same weights, the pixel operators against NVIDIA's one by
one, the input transform left as it was, the names, the evaluator/CLI dispatch and two ranks equal to one.

Toys (`ToyGenerator`): the image is an analytic sum of low-frequency sinusoids (1-4 cycles per image, far inside
the band of a 32 px grid) evaluated at the pixel centres moved by the input transform, so G is exactly
equivariant ("equivariant"); "frozen" ignores the transform; "sticky" adds a pixel-fixed texture (texture sticking
in its purest form); "roll" shows a white-noise texture rolled by the transform's whole-pixel translation (exact
for integer moves, and destroyed by any filtering).

NVIDIA's code runs in a subprocess from a checkout (env GANPIPE_NVLABS_STYLEGAN3_CHECKOUT, else a clone of the
local mirror), imported as tools/fixtures/make_nvlabs_stylegan3_fixture.py imports it (CPU reference ops); it is
never copied here. Its randomness is aligned with ours by recording what it drew (w, translations, angles) and
replaying those through our metric.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import Tensor, nn

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.export import ExportedGenerator, write_export
from pipeline.families import get_family
from pipeline.metrics import EvalConfig, Evaluator, better
from pipeline.metrics import equivariance as eq
from pipeline.metrics.equivariance import (
    Moves,
    equivariance_metrics,
    image_errors,
    pseudo_rotate,
    psnr,
    rotate,
    shift_fractional,
    shift_integer,
)
from pipeline.metrics.features import Abandoned
from pipeline.metrics.spec import EQ_KINDS, parse_metric
from pipeline.models.conditioning import ClassConditioning, NoConditioning
from pipeline.models.stylegan3 import Generator, image_transform
from pipeline.models.stylegan_sampling import StyleGAN3Sampler
from tests.conftest import free_port
from tests.export.nvlabs3_pickle import nvlabs_stylegan3_checkout
from tests.models.nvlabs_stylegan3_fixture import fixture, fixture_config, fixture_path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = fixture_path("t")
RES = 32
ALL = ["eqt16_int", "eqt16_frac", "eqr16"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------------
# Toy generators


class ToyInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("transform", torch.eye(3))


class ToyMapping(nn.Module):
    def forward(self, z: Tensor, c: Tensor | None, truncation_psi: float = 1, **_: Any) -> Tensor:
        return z[:, None, :]  # one w per image: the sinusoids' phases


class ToySynthesis(nn.Module):
    """See the module docstring: `mode` in equivariant, frozen, sticky, roll."""

    def __init__(self, resolution: int, mode: str, num_waves: int = 6) -> None:
        super().__init__()
        self.resolution, self.mode, self.input = resolution, mode, ToyInput()
        g = torch.Generator().manual_seed(1)
        angle = torch.rand(num_waves, generator=g, dtype=torch.float64) * 2 * math.pi
        radius = 1 + 3 * torch.rand(num_waves, generator=g, dtype=torch.float64)  # cycles per image
        self.register_buffer("freqs", torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1))
        amps = (0.5 + torch.rand(3, num_waves, generator=g, dtype=torch.float64)) * (0.5 / math.sqrt(num_waves))
        self.register_buffer("amps", amps)
        self.register_buffer("texture", torch.randn(3, resolution, resolution, generator=g, dtype=torch.float64))

    def forward(self, ws: Tensor, noise_mode: str = "const", force_fp32: bool = False) -> Tensor:
        t = self.input.transform.to(torch.float64)
        w = ws[:, 0].to(torch.float64)
        if self.mode == "roll":  # whole-pixel translation only: the texture's pixels move, unfiltered
            dx, dy = round(-float(t[0, 2]) * self.resolution), round(-float(t[1, 2]) * self.resolution)
            img = self.texture[None] * (1 + 0.1 * w[:, :1, None, None])
            return torch.roll(img, shifts=(dy, dx), dims=(2, 3)).to(torch.float32)
        u = (torch.arange(self.resolution, dtype=torch.float64) + 0.5) / self.resolution - 0.5  # image units
        py, px = torch.meshgrid(u, u, indexing="ij")
        if self.mode == "frozen":
            qx, qy = px, py
        else:  # the pixel centre p seen through the transform: the point of the pattern it shows
            qx, qy = t[0, 0] * px + t[0, 1] * py + t[0, 2], t[1, 0] * px + t[1, 1] * py + t[1, 2]
        k = self.freqs.shape[0]
        arg = 2 * math.pi * (self.freqs[:, 0, None, None] * qx + self.freqs[:, 1, None, None] * qy)  # [K, H, W]
        waves = torch.sin(arg[None] + w[:, :k, None, None])  # [N, K, H, W]
        img = torch.einsum("ck,nkhw->nchw", self.amps, waves)
        if self.mode == "sticky":
            img = img + 0.1 * self.texture[None]
        return img.to(torch.float32)


class ToyGenerator(nn.Module):
    def __init__(self, mode: str, resolution: int = RES) -> None:
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.img_resolution = 8, 0, 8, resolution
        self.mapping, self.synthesis = ToyMapping(), ToySynthesis(resolution, mode)
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler finds the device from a parameter

    def forward(self, z: Tensor, c: Tensor | None, **kwargs: Any) -> Tensor:
        return self.synthesis(self.mapping(z, c))


def toy(mode: str, resolution: int = RES) -> StyleGAN3Sampler:
    return StyleGAN3Sampler(ToyGenerator(mode, resolution).eval(), NoConditioning(), "toy")


def score(sampler: StyleGAN3Sampler, names: list[str], **kwargs: Any) -> dict[str, float]:
    return equivariance_metrics(sampler, [parse_metric(n) for n in names], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Oracles


def test_an_exactly_equivariant_generator_scores_high() -> None:
    out = score(toy("equivariant"), ALL)
    print("equivariant toy:", out)
    assert out["eqt16_int"] > 120  # pixel centres move by whole pixels: float32 rounding only
    assert out["eqt16_frac"] > 55  # what Lanczos-3 leaves of 1-4 cycles per image
    assert out["eqr16"] > 55  # what the band-limiting filters and bilinear sampling leave


@pytest.mark.parametrize("mode", ["frozen", "sticky"])
def test_generators_that_ignore_the_move_or_stick_to_pixels_score_low(mode: str) -> None:
    out = score(toy(mode), ALL)
    print(f"{mode} toy:", out)
    assert all(v < 30 for v in out.values()), out


def test_the_integer_translation_of_a_pure_shift_is_exact() -> None:
    # White noise has all frequencies: any filtering or off-by-one shift would cost tens of dB.
    assert score(toy("roll"), ["eqt16_int"]) == {"eqt16_int": math.inf}


def test_pixel_operators_on_known_signals() -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    moved, mask = shift_integer(x, 2 / 16, -1 / 16)
    assert torch.equal(moved[:, :, :-1, 2:], x[:, :, 1:, :-2]) and int(mask[0, 0].sum()) == 14 * 15
    # A fractional shift by whole pixels is the integer shift (Lanczos at 0 is a delta) on fewer pixels.
    frac, frac_mask = shift_fractional(x, 2 / 16, -1 / 16)
    assert torch.allclose(frac * frac_mask, moved * frac_mask, atol=1e-6)
    assert bool((frac_mask <= mask).all()) and int(frac_mask[0, 0].sum()) == (16 - 5) * (16 - 5)
    # A quarter turn of a band-limited pattern: the analytic rotated pattern inside the mask.
    u = (torch.arange(32, dtype=torch.float64) + 0.5) / 32 - 0.5
    py, px = torch.meshgrid(u, u, indexing="ij")
    pattern = torch.sin(2 * math.pi * (3 * px + 2 * py))[None, None].float()
    turned, turned_mask = rotate(pattern, math.pi / 2)  # output p shows input R^-1 p: (x, y) <- (-y, x)
    expected = torch.sin(2 * math.pi * (-3 * py + 2 * px))[None, None].float()
    assert 0 < turned_mask.sum() < 32 * 32
    assert float(((turned - expected) * turned_mask).abs().max()) < 5e-3
    filtered, filtered_mask = pseudo_rotate(pattern, 0.3)  # inside the band: kept as it is
    assert float(((filtered - pattern) * filtered_mask).abs().max()) < 5e-3


def test_psnr_pools_sums_over_images_like_nvidia() -> None:
    assert psnr(0.0, 10.0) == math.inf and math.isnan(psnr(0.0, 0.0))
    assert psnr(4.0, 1.0) == pytest.approx(0.0)  # MSE 4 = the squared peak-to-peak range of [-1, 1]
    render = toy("sticky").G.synthesis
    moves = Moves((0.125, 0.0), (0.05, -0.02), 1.0)
    errors = image_errors(lambda t, r: _drawn(render, image_transform(t, r)), EQ_KINDS, moves)
    assert errors.shape == (4, 3, 2) and errors.dtype == torch.float64 and bool((errors[..., 1] > 0).all())


def _drawn(synthesis: ToySynthesis, transform: Tensor) -> Tensor:
    before = synthesis.input.transform.clone()
    synthesis.input.transform.copy_(transform)
    try:
        return synthesis(torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(3)))
    finally:
        synthesis.input.transform.copy_(before)


def test_metrics_asked_together_share_images_and_moves() -> None:
    together = score(toy("sticky"), ["eqt8_int", "eqt6_int", "eqr5", "eqt5_frac"])
    alone = score(toy("sticky"), ["eqt6_int"])
    assert together["eqt6_int"] == alone["eqt6_int"]  # images 0..5 and the first two groups' moves either way
    assert together["eqt8_int"] != together["eqt6_int"]
    assert score(toy("sticky"), ["eqr5"])["eqr5"] == together["eqr5"]
    assert score(toy("sticky"), ["eqt5_frac"], seed=1) != {"eqt5_frac": together["eqt5_frac"]}


# ----------------------------------------------------------------------------------------------------------------
# StyleGAN3: the transform buffer, dispatch through the evaluator and the CLI, generators without a transform


def tiny_stylegan3_model(**synthesis: Any) -> dict[str, Any]:
    return {
        "z_dim": 8,
        "w_dim": 8,
        "mapping": {"num_layers": 2},
        "synthesis": {"channel_base": 256, "channel_max": 16, **synthesis},
        "discriminator": {"channel_base": 64, "channel_max": 16},
    }


def tiny_sampler(family_name: str, model: dict[str, Any], resolution: int = 16) -> Any:
    family = get_family(family_name)
    spec = family.spec(model, resolution)
    torch.manual_seed(0)
    G = family.build_generator(spec).eval().requires_grad_(False)
    return family.make_sampler(G, family.build_conditioning(spec))


def test_the_stored_transform_is_restored_also_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = tiny_sampler("stylegan3", tiny_stylegan3_model())
    stored = image_transform((0.1, -0.2), 30.0)
    sampler.G.synthesis.input.transform.copy_(stored)
    out = score(sampler, ["eqt4_int", "eqt4_frac", "eqr4"])
    assert all(math.isfinite(v) for v in out.values()), out
    assert torch.equal(sampler.G.synthesis.input.transform, stored)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("rotation failed")

    monkeypatch.setattr(eq, "rotate", broken)
    with pytest.raises(RuntimeError, match="rotation failed"):
        score(sampler, ["eqr4"])
    assert torch.equal(sampler.G.synthesis.input.transform, stored)
    calls = iter([False, True])
    with pytest.raises(Abandoned):
        score(sampler, ["eqt8_int"], should_stop=lambda: next(calls))
    assert torch.equal(sampler.G.synthesis.input.transform, stored)


def test_the_evaluator_computes_them_beside_other_metrics(shards: str, cache: str) -> None:
    sampler = toy("sticky", 16)
    cfg = EvalConfig(metrics=["fid8", "eqt8_int", "eqt8_frac", "eqr8"], extractor="small", batch_size=4)
    out = Evaluator(cfg, shards, 16, cache).evaluate(sampler)
    assert set(out) == {"fid8", "eqt8_int", "eqt8_frac", "eqr8"}
    assert out["eqt8_int"] == score(sampler, ["eqt8_int"])["eqt8_int"]
    # No reals needed: no --data, no extractor.
    alone = Evaluator(EvalConfig(metrics=["eqr8"]), None, 16, cache)
    assert alone.evaluate(sampler) == {"eqr8": out["eqr8"]} and alone.extractor_id is None
    assert better("eqt50k_int", 60.0, 55.0) and not better("eqr50k", 20.0, 30.0)


def test_generators_without_an_input_transform_are_one_line_errors(cache: str) -> None:
    sampler = tiny_sampler("stylegan2", tiny_stylegan3_model())
    with pytest.raises(ConfigError, match=r"eqt8_int, eqr8 need\(s\) a generator with an input transform") as e:
        Evaluator(EvalConfig(metrics=["eqt8_int", "eqr8"]), None, 16, cache).evaluate(sampler)
    assert "stylegan2 generator has none" in str(e.value) and "\n" not in str(e.value)


def test_ganpipe_eval_of_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for family_name in ("stylegan3", "stylegan2"):
        model = tiny_stylegan3_model()
        sampler = tiny_sampler(family_name, model)
        out = str(tmp_path / family_name)
        write_export(out, ExportedGenerator(family_name, model, 16), {"G_ema": sampler.G.state_dict()})
        code = main(["eval", out, "--metrics", "eqt4_int,eqt4_frac,eqr4", "--no-progress", "--device", "cpu"])
        captured = capsys.readouterr()
        if family_name == "stylegan3":
            assert code == 0, captured.err
            record = json.loads(captured.out)
            assert set(record["results"]) == {"eqt4_int", "eqt4_frac", "eqr4"} and record["data"] is None
            assert all(math.isfinite(v) and v > 0 for v in record["results"].values())
        else:
            assert code == 2 and captured.err.count("\n") == 1
            assert "eqt4_int, eqt4_frac, eqr4 need(s) a generator with an input transform" in captured.err


# ----------------------------------------------------------------------------------------------------------------
# Distributed: two gloo ranks give the numbers of one process


def _rank_worker(rank: int, world: int, port: int, names: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        result = score(toy("sticky", 16), names)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    names = ["eqt10_int", "eqt7_frac", "eqr10"]  # 3 groups (the last one partial): ranks hold 1 and 2
    out = str(tmp_path / "dist.json")
    # fork: the workers inherit the imported modules (spawning would import torch and pipeline twice more)
    mp.start_processes(_rank_worker, args=(2, free_port(), names, out), nprocs=2, join=True, start_method="fork")
    assert json.loads(Path(out).read_text()) == score(toy("sticky", 16), names)


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA's metric code on the same weights


_NVIDIA_SCRIPT = textwrap.dedent(
    '''
    """Run NVIDIA's compute_equivariance_metrics on the fixture's weights; record what it drew and its operators'
    outputs on one random image at those moves."""
    import importlib.util, sys, types
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file

    repo, checkout, fixture, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    res, num, seed = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("tool", repo / "tools/fixtures/make_nvlabs_stylegan3_fixture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    networks = tool.import_nvlabs_networks(checkout)  # NVIDIA's code on sys.path, its CUDA plugins off
    from metrics import equivariance as nv_eq, metric_utils

    G = tool.build_generator(networks, tool.CONFIGS["t"], res)
    prefix = f"{res}/G/"
    G.load_state_dict({k[len(prefix):]: v for k, v in load_file(fixture).items() if k.startswith(prefix)}, strict=True)

    def labels(opts, batch_size):  # NVIDIA draws dataset labels; any one-hot classes do here
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.eye(G.c_dim)[torch.randint(G.c_dim, [batch_size], generator=g)]

    metric_utils.iterate_random_labels = labels
    rec = {"ws": [], "M": [], "t_int": [], "t_frac": [], "angle": []}
    synthesis_forward = type(G.synthesis).forward

    def forward(self, ws, **kwargs):  # records every input transform, and w at the unmoved draw
        rec["M"].append(self.input.transform.clone())
        if torch.equal(self.input.transform, torch.eye(3)):
            rec["ws"].append(ws.clone())
        return synthesis_forward(self, ws, **kwargs)

    type(G.synthesis).forward = forward
    ops = {"int": nv_eq.apply_integer_translation, "frac": nv_eq.apply_fractional_translation,
           "rot": nv_eq.apply_fractional_rotation, "pseudo": nv_eq.apply_fractional_pseudo_rotation}

    def recorded(key, name):
        def run(x, *args, **kwargs):
            rec[key].append([float(a) for a in args] if len(args) > 1 else float(args[0]))
            return ops[name](x, *args, **kwargs)
        return run

    nv_eq.apply_integer_translation = recorded("t_int", "int")
    nv_eq.apply_fractional_translation = recorded("t_frac", "frac")
    nv_eq.apply_fractional_rotation = recorded("angle", "rot")

    class Progress:
        def sub(self, **kwargs):
            return self
        def update(self, *args):
            pass

    opts = types.SimpleNamespace(G=G, device=torch.device("cpu"), num_gpus=1, rank=0,
                                 G_kwargs={"force_fp32": True}, progress=Progress())
    torch.manual_seed(seed)
    psnrs = nv_eq.compute_equivariance_metrics(opts, num_samples=num, batch_size=4, compute_eqt_int=True,
                                               compute_eqt_frac=True, compute_eqr=True)
    result = {k: torch.tensor(v) for k, v in rec.items() if k not in ("ws", "M")}
    result["ws"], result["M"] = torch.stack(rec["ws"]), torch.stack(rec["M"])
    result["psnr"] = torch.tensor([float(p) for p in psnrs], dtype=torch.float64)
    x = torch.randn([2, 3, res, res], generator=torch.Generator().manual_seed(seed))
    result["x"] = x
    for i, angle in enumerate(rec["angle"]):
        for key, moves in (("int", rec["t_int"][i]), ("frac", rec["t_frac"][i])):
            result[f"{key}/{i}"], result[f"{key}_mask/{i}"] = ops[key](x, *map(torch.tensor, moves))
        for key in ("rot", "pseudo"):
            result[f"{key}/{i}"], result[f"{key}_mask/{i}"] = ops[key](x, torch.tensor(angle))
    save_file({k: v.contiguous() for k, v in result.items()}, out)
    '''
)


@pytest.fixture(scope="session")
def nvidia_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nvlabs_stylegan3_checkout(tmp_path_factory.mktemp("nvlabs"))


@cache
def fixture_generator(resolution: int) -> StyleGAN3Sampler:
    """Our StyleGAN3-T with the fixture's NVIDIA weights (c_dim 3) behind its sampler."""
    meta, _, tensors = fixture("t")
    cfg = fixture_config(meta)
    G = Generator(cfg, resolution, magnitude_ema_beta=meta["magnitude_ema_beta"]).eval().requires_grad_(False)
    prefix = f"{resolution}/G/"
    G.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return StyleGAN3Sampler(G, ClassConditioning(meta["c_dim"]), "stylegan3")


NVIDIA_PSNR_TOLERANCE_DB = 1e-3  # measured: <= 1e-4 dB (float32 rounding of the two generators and filters)
NVIDIA_PIXEL_TOLERANCE = 1e-5  # measured: <= 3e-6 (float32 filter design vs our float64 one)


def test_matches_nvidia_metric_code_on_the_same_weights(nvidia_checkout: Path, tmp_path: Path) -> None:
    script, out = tmp_path / "nvidia_eq.py", tmp_path / "nvidia.safetensors"
    script.write_text(_NVIDIA_SCRIPT)
    res, num, seed = 16, 8, 7  # two groups of 4: NVIDIA's code takes ~1 s per group on one CPU core
    args = [sys.executable, str(script), str(REPO), str(nvidia_checkout), str(FIXTURE), str(out), str(res)]
    proc = subprocess.run([*args, str(num), str(seed)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    nv = load_file(str(out))
    sampler = fixture_generator(res)
    G = sampler.G
    total = torch.zeros(len(EQ_KINDS), 2, dtype=torch.float64)
    groups = nv["angle"].shape[0]
    assert groups == num // 4 and nv["M"].shape[0] == 4 * groups
    for b in range(groups):
        moves = Moves(tuple(nv["t_int"][b].tolist()), tuple(nv["t_frac"][b].tolist()), float(nv["angle"][b]))
        ours = [image_transform(), image_transform(moves.translate_int), image_transform(moves.translate_frac),
                image_transform(rotate_deg=math.degrees(moves.angle))]  # fmt: skip
        assert torch.allclose(torch.stack(ours), nv["M"][4 * b : 4 * b + 4], atol=1e-6)  # NVIDIA's order of draws

        def render(translate: tuple[float, float], rotate_deg: float, ws: Tensor = nv["ws"][b]) -> Tensor:
            with sampler.moved(translate, rotate_deg):
                return G.synthesis(ws, noise_mode="const", force_fp32=True)

        with torch.no_grad():
            total += image_errors(render, EQ_KINDS, moves).sum(dim=0)
        x = nv["x"]
        for key, (img, mask) in {
            "int": shift_integer(x, *moves.translate_int),
            "frac": shift_fractional(x, *moves.translate_frac),
            "rot": rotate(x, moves.angle),
            "pseudo": pseudo_rotate(x, moves.angle),
        }.items():
            assert torch.equal(mask, nv[f"{key}_mask/{b}"]), key
            assert float(((img - nv[f"{key}/{b}"]) * mask).abs().max()) < NVIDIA_PIXEL_TOLERANCE, key
    ours_psnr = [psnr(float(s), float(m)) for s, m in total]
    theirs = nv["psnr"].tolist()
    print("NVIDIA:", theirs, "ours:", ours_psnr)
    assert ours_psnr == pytest.approx(theirs, abs=NVIDIA_PSNR_TOLERANCE_DB)
