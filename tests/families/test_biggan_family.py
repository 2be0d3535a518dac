"""The BigGAN family through the engine: hinge loss and orthogonal regularization against their formulas, k D steps
per G step each on its own real batch with exact resume, cross-replica BN on two gloo ranks equal to one process
with the whole batch, the recipes' published values, and train -> export -> generate through the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor, nn

from pipeline.checkpoint import list_checkpoints, load_checkpoint
from pipeline.cli import main
from pipeline.config import config_from_dict, load_config
from pipeline.export import load_generator
from pipeline.families import get_family
from pipeline.models.sampling import seed_latents
from pipeline.objectives import Networks, Phase, PhaseInputs
from pipeline.objectives.biggan import BigGANLossConfig, BigGANObjective, ortho_weights, orthogonal_regularization
from pipeline.train import train
from pipeline.train.distributed import leave_process_group
from pipeline.train.run import build_trainer
from pipeline.train.task import GANTask
from tests.conftest import REPO, free_port

TINY = str(REPO / "recipes" / "biggan" / "tiny.yaml")
FAST = [
    "data.batch_size=8",
    "data.synth.n=64",
    "model.ch=4",
    "model.d_ch=2",
    "model.z_dim=16",
    "model.shared_dim=8",
    "train.progress_bar=false",
    "logger.csv=false",
    "eval.metrics=[]",
]


def _config(tmp_path: Path, *overrides: str, run: str = "run") -> Any:
    base = [f"run_dir={tmp_path / run}", f"data.cache_dir={tmp_path / 'cache'}", *FAST]
    return load_config(TINY, [*base, *overrides])


# ----------------------------------------------------------------------------------------------------------------
# The objective's numbers


class FixedD(nn.Module):
    """D(x) = mean of x's pixels times `scale` (+ the class index when given)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, img: Tensor, c: Tensor | None = None) -> Tensor:
        out = img.mean(dim=[1, 2, 3])[:, None] * self.scale
        return out if c is None else out + c[:, None].float()


class LinearG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(3, 4)
        self.fc = nn.Linear(4, 3 * 2 * 2)  # tall: [12, 4]
        self.mix = nn.Conv2d(3, 3, 2, padding="same", bias=False)  # wide: [3, 12]

    def forward(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        return self.mix(self.fc(z).view(-1, 3, 2, 2))


@pytest.mark.parametrize("kind", ["hinge", "ns"])
def test_losses_are_their_formulas(kind: str) -> None:
    torch.manual_seed(0)
    G, D = LinearG(), FixedD()
    objective = BigGANObjective(BigGANLossConfig(kind=kind, g_ortho=1e-3))
    real, z = torch.rand(5, 3, 2, 2) * 2 - 1, torch.randn(5, 4)
    real_c, gen_c = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 1, 0, 0])
    inputs = PhaseInputs(real, real_c, z, gen_c)
    d_loss, stats = objective.phase_loss(Phase("Dmain", "D"), Networks(G, D), inputs)
    real_logits = D(real, real_c)
    fake_logits = D(G(z), gen_c).detach()
    if kind == "hinge":
        expected = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    else:
        expected = -F.logsigmoid(real_logits).mean() - torch.log(1 - torch.sigmoid(fake_logits)).mean()
    torch.testing.assert_close(d_loss, expected)
    assert stats["Loss/D/loss"] == pytest.approx(float(expected.detach()))
    g_loss, stats = objective.phase_loss(Phase("Gmain", "G", 2, 1), Networks(G, D), inputs)
    fake_logits = D(G(z), gen_c)
    adversarial = -fake_logits.mean() if kind == "hinge" else -F.logsigmoid(fake_logits).mean()
    ortho = sum(
        1e-3 / 2 * ((w @ w.t()) * (1 - torch.eye(w.shape[0]))).square().sum()
        for w in (G.fc.weight, G.mix.weight.flatten(1))
    )
    torch.testing.assert_close(g_loss, adversarial + ortho)
    torch.testing.assert_close(stats["Loss/G/ortho"], ortho.detach())


def test_orthogonal_regularization_gradient_is_biggans() -> None:
    """BigGAN-PyTorch's utils.ortho adds 2 * beta * ((W W^T) * (1 - I)) W to the gradient of every 2+-D weight but
    the shared embedding; our loss term has exactly that gradient."""
    torch.manual_seed(0)
    G = LinearG()
    beta = 1e-4
    params = ortho_weights(G, exclude=("shared",))
    assert [p.shape for p in params] == [G.fc.weight.shape, G.mix.weight.shape]
    orthogonal_regularization(params, beta).backward()
    for param in params:  # a tall weight (through its small Gram matrix) and a wide one
        w = param.detach().flatten(1)
        expected = 2 * beta * ((w @ w.t()) * (1 - torch.eye(w.shape[0]))) @ w
        torch.testing.assert_close(param.grad.flatten(1), expected)
    assert G.shared.weight.grad is None


def test_d_steps_schedule() -> None:
    phases = BigGANObjective(BigGANLossConfig(d_steps=3)).phases()
    runs = {p.name: [s for s in range(9) if p.runs_at(s)] for p in phases}
    assert [p.name for p in phases] == ["Dmain", "Gmain"]  # G steps after that step's D update
    assert runs == {"Dmain": list(range(9)), "Gmain": [2, 5, 8]}


# ----------------------------------------------------------------------------------------------------------------
# Through the engine


def test_k_d_steps_on_fresh_batches_and_exact_resume(tmp_path: Path) -> None:
    """d_steps=3, 6 steps of 8 images: D steps 6 times and G twice, on 6 distinct real batches (48 images of the
    stream); stopping after 2 steps (mid-cycle) and resuming ends bit for bit where the uninterrupted run ends."""
    settings = ["loss.d_steps=3", "loss.g_ortho=1e-4", "train.ema_start_kimg=0.016", "train.ema_kimg=0.1",
                "train.ema_rampup=null", "train.checkpoint_every_kimg=0.016", "train.samples_every_kimg=1"]  # fmt: skip
    full = _config(tmp_path, *settings, "train.total_kimg=0.048", run="full")
    train(full)
    expected = load_checkpoint(list_checkpoints(full.run_dir)[-1])
    assert expected["counters"]["cur_nimg"] == 48 and expected["counters"]["step_idx"] == 6
    steps = [opt["state"][0]["step"].item() for opt in expected["optimizers"]]
    assert steps == [2, 6]  # G, D: Adam steps taken
    assert expected["data"]["samples_seen"] == 48  # one fresh real batch per step

    train(_config(tmp_path, *settings, "train.total_kimg=0.016", run="split"))
    second = _config(tmp_path, *settings, "train.total_kimg=0.048", run="split")
    train(second, resume="auto")
    resumed = load_checkpoint(list_checkpoints(second.run_dir)[-1])
    assert resumed["counters"] == expected["counters"]
    for net in ("G", "D", "G_ema"):
        for key, value in expected[net].items():  # weights, spectral-norm u0/sv0, BN statistics
            assert torch.equal(resumed[net][key], value), f"{net}.{key}"
    for opt_r, opt_e in zip(resumed["optimizers"], expected["optimizers"], strict=True):
        for idx, state in opt_e["state"].items():
            for name, value in state.items():
                assert torch.equal(opt_r["state"][idx][name], value), f"optimizer state {idx}.{name}"


def test_ema_is_a_copy_of_g_until_ema_start(tmp_path: Path) -> None:
    """BigGAN-PyTorch averages from the G step at which the iteration count reaches ema_start; before, G_ema = G.
    With 3 D steps per G step of 8 images, G steps end at 24 and 48 images; ema_start_kimg=0.048."""
    settings = ["loss.d_steps=3", "train.ema_start_kimg=0.048", "train.ema_kimg=0.1", "train.ema_rampup=null",
                "train.checkpoint_every_kimg=0.024", "train.samples_every_kimg=1"]  # fmt: skip
    train(_config(tmp_path, *settings, "train.total_kimg=0.048"))
    first, last = (load_checkpoint(c) for c in list_checkpoints(str(tmp_path / "run"))[-2:])
    assert first["counters"]["cur_nimg"] == 24 and last["counters"]["cur_nimg"] == 48
    assert all(torch.equal(first["G_ema"][k], v) for k, v in first["G"].items() if "weight" in k)  # a copy
    beta = 0.5 ** (24 / 100)  # ema_beta over the 24 images since the last update
    for k in ("linear.weight", "blocks.0.0.conv1.weight"):
        expected = last["G"][k] + (first["G_ema"][k] - last["G"][k]) * beta  # averaging from G step 48
        torch.testing.assert_close(last["G_ema"][k], expected)


class PinnedTask(GANTask):
    """Latents and fake classes for the global batch from a generator seeded by (step, phase); each rank takes its
    rows, so one process and two ranks see the same numbers."""

    def draw_latents(self, phase: Phase, n: int, real_c: Any) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(1000 * self.step_idx + self.phases.index(phase))
        z = torch.randn([n * self.world_size, self.z_dim], generator=gen)
        c = torch.randint(6, [n * self.world_size], generator=gen)
        rows = slice(self.global_rank * n, (self.global_rank + 1) * n)
        return z[rows].to(self.device), c[rows].to(self.device)


def _bn_train(cfg_dict: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(cfg.seed)
    task = PinnedTask(cfg)
    world, rank = cfg.train.devices, int(os.environ.get("RANK", "0"))
    gen = torch.Generator().manual_seed(7)
    batches = [
        (torch.randint(0, 256, [8, 3, 32, 32], generator=gen, dtype=torch.uint8), torch.randint(6, [8], generator=gen))
        for _ in range(3)
    ]
    per = 8 // world
    data = [{"image": x[rank * per : (rank + 1) * per], "label": y[rank * per : (rank + 1) * per]} for x, y in batches]
    build_trainer(cfg, callbacks=[]).fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return {"G": task.G.state_dict(), "D": task.D.state_dict(), "G_ema": task.G_ema.state_dict()}


def _bn_worker(rank: int, port: int, cfg_dict: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        del os.environ[var]
    state = _bn_train(cfg_dict)
    leave_process_group()
    torch.save(state, f"{out}-{rank}.pt")


@pytest.mark.parametrize("sync_batchnorm", [True, False], ids=["sync", "local"])
def test_cross_replica_bn_two_ranks_equal_one_process(tmp_path: Path, sync_batchnorm: bool) -> None:
    """G's conditional BNs normalise with the global batch's statistics: 2 ranks x 4 images end 3 steps (2 D steps
    per G step) with the weights and BN buffers of 1 process x 8 images. Adam's eps is 1e-3 here: the biases that
    a BatchNorm follows have zero gradient in exact arithmetic, and at eps 1e-6 Adam turns their rounding-level
    gradients (different in the two topologies) into steps of ~lr."""
    common = ["train.accelerator=cpu", "loss.d_steps=2", "train.ema_rampup=null", "train.total_kimg=1",
              "optim.eps=1e-3"]  # fmt: skip
    single = _config(tmp_path, *common, "train.devices=1")
    dist = _config(tmp_path, *common, "train.devices=2", "train.backend=gloo", f"train.sync_batchnorm={sync_batchnorm}")
    out = str(tmp_path / "rank")
    mp.spawn(_bn_worker, args=(free_port(), dist.to_dict(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}-{r}.pt", weights_only=True) for r in range(2)]
    threads = torch.get_num_threads()
    try:
        ref = _bn_train(single.to_dict())
    finally:
        torch.set_num_threads(threads)
    differ = []
    for net in ("G", "D", "G_ema"):
        for key, value in ref[net].items():
            torch.testing.assert_close(ranks[1][net][key], ranks[0][net][key], rtol=0, atol=0)
            if not torch.allclose(ranks[0][net][key].float(), value.float(), rtol=0, atol=1e-5):
                differ.append(f"{net}.{key}")
    if sync_batchnorm:
        assert not differ, differ
    else:  # per-rank statistics of half batches: G's BN buffers and weights move differently
        assert "G.blocks.0.0.bn1.bn.running_var" in differ and "G.linear.weight" in differ


# ----------------------------------------------------------------------------------------------------------------
# Recipes and the CLI


def _resolved(recipe: str) -> dict[str, Any]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", f"recipes/biggan/{recipe}.yaml"],
                          capture_output=True, text=True, cwd=REPO, check=True)  # fmt: skip
    return yaml.safe_load(proc.stdout)


def test_recipes_hold_the_published_values() -> None:
    # BigGAN-2048 (Brock et al. 2019; BigGAN-PyTorch utils.py defaults for the paper's setup): ch 96, z 120, shared
    # 128, attention at 64, lr 5e-5 / 2e-4, betas (0, 0.999), adam eps 1e-6, 2 D steps, ortho 1e-4, batch 2048,
    # EMA 0.9999 per G iteration from iteration 20k, SN eps 1e-6, BN eps 1e-5, orthogonal init, cross-replica BN.
    cfg = _resolved("imagenet128")
    m, loss, optim, t = cfg["model"], cfg["loss"], cfg["optim"], cfg["train"]
    assert (m["architecture"], m["ch"], m["z_dim"], m["shared_dim"], m["hier"]) == ("biggan", 96, 120, 128, True)
    assert m["c_dim"] == 1000 and m["g_attention"] == m["d_attention"] == [64]
    assert (m["sn_eps"], m["bn_eps"], m["init"]) == (1e-6, 1e-5, "ortho")
    assert (loss["kind"], loss["d_steps"], loss["g_ortho"]) == ("hinge", 2, 1e-4)
    assert optim == {"g_lr": 5e-5, "d_lr": 2e-4, "betas": [0.0, 0.999], "eps": 1e-6}
    assert cfg["data"]["batch_size"] == 2048 and cfg["data"]["resolution"] == 128 and t["sync_batchnorm"] is True
    per_g_iteration = 2048 * 2  # images per G iteration (2 D steps)
    assert 0.5 ** (per_g_iteration / (t["ema_kimg"] * 1000)) == pytest.approx(0.9999, abs=1e-9)
    assert t["ema_start_kimg"] * 1000 == 20_000 * per_g_iteration and t["ema_rampup"] is None
    assert t["total_kimg"] * 1000 == 150_000 * per_g_iteration
    # StudioGAN CIFAR10 BigGAN (configs/CIFAR10/BigGAN.yaml + config.py defaults): z 80, shared 128, G 384 / D 192
    # channels, attention G block 2 / D block 1 (16x16), 5 D steps, lr 2e-4, betas (0.5, 0.999), BN eps 1e-4,
    # EMA 0.9999 from step 1000, 100k steps of batch 64.
    cfg = _resolved("cifar10")
    m, t = cfg["model"], cfg["train"]
    assert (m["z_dim"], m["shared_dim"], m["ch"] * 4, m["d_ch"] * 4, m["c_dim"]) == (80, 128, 384, 192, 10)
    assert m["g_attention"] == [16] and m["d_attention"] == [16] and m["bn_eps"] == 1e-4
    assert cfg["loss"]["d_steps"] == 5 and cfg["loss"]["g_ortho"] == 0
    assert cfg["optim"]["g_lr"] == cfg["optim"]["d_lr"] == 2e-4 and cfg["optim"]["betas"] == [0.5, 0.999]
    assert 0.5 ** (64 * 5 / (t["ema_kimg"] * 1000)) == pytest.approx(0.9999, abs=1e-8)
    assert t["ema_start_kimg"] * 1000 == 1000 * 64 * 5 and t["total_kimg"] * 1000 == 100_000 * 64 * 5
    # BigGAN-deep 256 (the paper's App. B; BigGAN-PyTorch scripts/launch_BigGAN_deep.sh: ch 128, depth 2, z 128,
    # shared 128, attention 64, G_ortho 0): the BigGAN-2048 optimisation otherwise.
    cfg = _resolved("imagenet256-deep")
    m = cfg["model"]
    assert (m["architecture"], m["ch"], m["z_dim"], m["shared_dim"], m["depth"]) == ("deep", 128, 128, 128, 2)
    assert cfg["data"]["resolution"] == 256 and m["g_attention"] == m["d_attention"] == [64]
    assert cfg["optim"] == {"g_lr": 5e-5, "d_lr": 2e-4, "betas": [0.0, 0.999], "eps": 1e-6}
    assert (cfg["loss"]["d_steps"], cfg["loss"]["g_ortho"], cfg["data"]["batch_size"]) == (2, 0.0, 2048)
    cfg = _resolved("tiny")  # the CPU demo: the synthetic shapes (6 classes), one class per grid column
    assert (cfg["data"]["resolution"], cfg["model"]["c_dim"], cfg["train"]["grid_cols"]) == (32, 6, 6)
    assert cfg["eval"]["metrics"] == ["acc1k"]


def test_train_export_and_generate_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, "train.total_kimg=0.016", "train.samples_every_kimg=1")
    assert get_family(cfg.family).name == "biggan"
    train(cfg)
    assert (Path(cfg.run_dir) / "samples" / "fakes000000.png").exists()
    export = tmp_path / "export"
    assert main(["export", str(cfg.run_dir), "--out", str(export)]) == 0
    out = tmp_path / "png"
    for cls in ("0", "3"):
        assert main(["generate", str(export), "--seeds", "5", "--class", cls, "--trunc", "0.5", "--outdir",
                     str(out / cls)]) == 0  # fmt: skip
    assert (out / "0" / "seed0005.png").read_bytes() != (out / "3" / "seed0005.png").read_bytes()
    grid = tmp_path / "classes.png"
    assert main(["generate", str(export), "--classes", "0-5", "--per-class", "3", "--out", str(grid)]) == 0
    cells = np.asarray(Image.open(grid)).reshape(6, 32, 3, 32, 3).transpose(0, 2, 1, 3, 4)  # [class, seed, ...]
    assert not np.array_equal(cells[0, 1], cells[0, 2]) and not np.array_equal(cells[0, 1], cells[4, 1])
    with torch.no_grad():  # row c holds seeds 0-2 of class c
        G = load_generator(str(export))
        expected = G(seed_latents([0, 1, 2], G.z_dim), torch.tensor([4, 4, 4]))
    pixels = (expected.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(cells[4].astype(int) - pixels.astype(int)).max() <= 1
    capsys.readouterr()
    assert main(["generate", str(export), "--seeds", "5", "--out", str(tmp_path / "x.png")]) != 0
    assert "--class" in capsys.readouterr().err  # a class-conditional G asks for its class
