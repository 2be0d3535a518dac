"""A second family, registered only here, proves the family contract: a DCGAN-style generator and discriminator
(Radford et al. 2016; BatchNorm in G, a projection discriminator for conditioning) with non-saturating or hinge
loss and 2 D steps per G step, trained, checkpointed, resumed, exported, sampled and evaluated through the same
commands as StyleGAN2 with no edit outside this file.

It also uses what the contract promises beyond two networks: a third trained network (InfoGAN's Q, trained with G
on the codes hidden in z), a frozen auxiliary network used by a loss (a fixed random feature net for feature
matching), text conditioning (captions tokenized in the data workers, embedded by a frozen encoder that exports
name instead of storing), and class conditioning by embedding index. Sync BatchNorm across two gloo ranks equals
one process with the whole batch.

The module is importable as `test_dcgan_family` (pytest puts this folder on sys.path), so processes that pytest
did not start find the family through GANPIPE_FAMILIES.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

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
from pipeline.data import StreamOptions, build_train_stream, ensure_synthetic_dataset
from pipeline.errors import CheckpointError, require
from pipeline.families import Family, NetworkSpec, get_family, register_family
from pipeline.models.conditioning import (
    ByteTokenizer,
    ClassConditioning,
    Conditioning,
    NoConditioning,
    TextCondition,
    TextConditioning,
)
from pipeline.objectives import Networks, Objective, Phase, PhaseInputs
from pipeline.objectives.regularizers import r1_penalty
from pipeline.train.distributed import leave_process_group
from pipeline.train.run import build_trainer
from pipeline.train.task import GANTask

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------------------------------
# The family: configs, networks, conditioning, objective, record


@dataclass
class DCGANConfig:
    z_dim: int = 32
    c_dim: int = 0  # classes (0 = none), fed to G and D as embedding indices
    text_dim: int = 0  # > 0: text-conditional, through a frozen hashed-byte encoder of this width
    text_seed: int = 0  # the encoder's weights are a function of this seed (exports name it, never store it)
    prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])  # grids, evaluation
    info_dim: int = 0  # > 0: the last info_dim entries of z are InfoGAN codes that a third network Q predicts
    channels: int = 32  # at 4x4, halved per doubling of the resolution (at least 8)
    img_channels: int = 3

    def validate(self, prefix: str) -> None:
        require(self.z_dim > self.info_dim >= 0, f"{prefix}.info_dim", self.info_dim, "must be in [0, z_dim)")
        require(self.c_dim == 0 or self.text_dim == 0, f"{prefix}.text_dim", self.text_dim, "classes or text, not both")
        require(self.channels >= 8, f"{prefix}.channels", self.channels, "must be >= 8")


@dataclass
class DCGANLossConfig:
    kind: Literal["ns", "hinge"] = "ns"
    d_steps: int = 2  # D updates per G update, each on its own real batch
    r1_gamma: float = 0.0  # > 0: R1 on reals in every D step
    feature_matching: float = 0.0  # > 0: G also matches the mean features of a frozen random net on reals
    info_weight: float = 1.0

    def validate(self, prefix: str) -> None:
        require(self.d_steps >= 1, f"{prefix}.d_steps", self.d_steps, "must be >= 1")


def _widths(cfg: DCGANConfig, resolution: int) -> dict[int, int]:
    res = [2**i for i in range(2, resolution.bit_length())]
    return {r: max(cfg.channels // (r // 4), 8) for r in res}


class HashedBytesEncoder(nn.Module):
    """A frozen text encoder: a fixed random embedding of byte tokens (seeded), mean-pooled over real tokens."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        table = torch.randn([ByteTokenizer.VOCAB_SIZE, dim], generator=torch.Generator().manual_seed(seed))
        self.register_buffer("table", table)

    def forward(self, tokens: Tensor) -> TextCondition:
        mask = tokens != ByteTokenizer.PAD
        emb = self.table[tokens] * mask[..., None]
        pooled = emb.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TextCondition(emb, pooled, mask)


class Generator(nn.Module):
    def __init__(self, cfg: DCGANConfig, resolution: int) -> None:
        super().__init__()
        self.z_dim, self.img_resolution, self.img_channels = cfg.z_dim, resolution, cfg.img_channels
        widths = _widths(cfg, resolution)
        self.embed = nn.Embedding(cfg.c_dim, cfg.z_dim) if cfg.c_dim else None
        self.text = nn.Linear(cfg.text_dim, cfg.z_dim) if cfg.text_dim else None
        # No bias before a BatchNorm (it would cancel it): DCGAN's layout, and no ill-conditioned parameter for Adam.
        self.fc = nn.Linear(cfg.z_dim, widths[4] * 16, bias=False)
        self.bn0 = nn.BatchNorm2d(widths[4])
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2),
                nn.Conv2d(widths[r // 2], widths[r], 3, padding=1, bias=False),
                nn.BatchNorm2d(widths[r]),
            )
            for r in list(widths)[1:]
        )
        self.to_rgb = nn.Conv2d(widths[resolution], cfg.img_channels, 3, padding=1)
        self.width4 = widths[4]

    def forward(self, z: Tensor, c: Any = None) -> Tensor:
        h = z
        if self.embed is not None:
            h = h + self.embed(c)
        if self.text is not None:
            h = h + self.text(c.pooled)
        x = F.relu(self.bn0(self.fc(h).view(-1, self.width4, 4, 4)))
        for block in self.blocks:
            x = F.relu(block(x))
        return torch.tanh(self.to_rgb(x))


class Discriminator(nn.Module):
    def __init__(self, cfg: DCGANConfig, resolution: int) -> None:
        super().__init__()
        widths = _widths(cfg, resolution)
        self.from_rgb = nn.Conv2d(cfg.img_channels, widths[resolution], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Conv2d(widths[r], widths[r // 2], 4, stride=2, padding=1) for r in reversed(list(widths)[1:])
        )
        features = widths[4] * 16
        self.out = nn.Linear(features, 1)
        self.embed = nn.Embedding(cfg.c_dim, features) if cfg.c_dim else None
        self.text = nn.Linear(cfg.text_dim, features) if cfg.text_dim else None

    def forward(self, img: Tensor, c: Any = None) -> Tensor:
        x = F.leaky_relu(self.from_rgb(img), 0.2)
        for block in self.blocks:
            x = F.leaky_relu(block(x), 0.2)
        h = x.flatten(1)
        out = self.out(h)
        if self.embed is not None:  # projection discriminator (Miyato & Koyama 2018)
            out = out + (self.embed(c) * h).sum(1, keepdim=True)
        if self.text is not None:
            out = out + (self.text(c.pooled) * h).sum(1, keepdim=True)
        return out


class InfoQ(nn.Module):
    """InfoGAN's Q: predicts the codes (the last info_dim entries of z) from an image."""

    def __init__(self, cfg: DCGANConfig, resolution: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cfg.img_channels, 8, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(32, cfg.info_dim),
        )  # fmt: skip

    def forward(self, img: Tensor) -> Tensor:
        return self.net(img)


def random_features(seed: int = 0) -> nn.Module:
    """A fixed random conv net: the frozen feature extractor of feature matching (Salimans et al. 2016)."""
    with torch.random.fork_rng():  # its weights are a function of `seed`, and training's RNG does not move
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def conditioning(spec: NetworkSpec) -> Conditioning:
    m: DCGANConfig = spec.model
    if m.text_dim:
        source = {"name": "hashed-bytes", "dim": m.text_dim, "seed": m.text_seed}
        encoder = functools.partial(HashedBytesEncoder, m.text_dim, m.text_seed)
        return TextConditioning(encoder, ByteTokenizer(32), m.prompts, source)
    if m.c_dim:
        return ClassConditioning(m.c_dim, encoding="index", key="model.c_dim")
    return NoConditioning()


class DCGANObjective(Objective):
    def __init__(self, cfg: DCGANLossConfig, info_dim: int) -> None:
        super().__init__()
        self.cfg, self.info_dim = cfg, info_dim

    def phases(self) -> list[Phase]:
        k = self.cfg.d_steps
        phases = [Phase("Dmain", "D"), Phase("Gmain", "G", interval=k, offset=k - 1)]
        if self.info_dim:
            phases.append(Phase("Info", ("G", "Q"), interval=k, offset=k - 1))
        return phases

    def learning_rate(self, net: str, optim: Any) -> float:
        return float(optim.d_lr) if net == "Q" else super().learning_rate(net, optim)

    def _d(self, nets: Networks, img: Tensor, c: Any, inputs: PhaseInputs) -> Tensor:
        return nets.D(inputs.augment(img) if inputs.augment is not None else img, c)

    def phase_loss(self, phase: Phase, nets: Networks, inputs: PhaseInputs) -> tuple[Tensor, dict[str, Tensor]]:
        hinge = self.cfg.kind == "hinge"
        if phase.name == "Dmain":
            with torch.no_grad():
                fake = nets.G(inputs.gen_z, inputs.gen_c)
            real = inputs.real_img.detach().requires_grad_(self.cfg.r1_gamma > 0)
            real_logits = self._d(nets, real, inputs.real_c, inputs)
            fake_logits = self._d(nets, fake, inputs.gen_c, inputs)
            if hinge:
                loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
            else:
                loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            if self.cfg.r1_gamma > 0:
                loss = loss + r1_penalty(real, real_logits).mean() * self.cfg.r1_gamma / 2
            return loss, {"Loss/D/loss": loss.detach()}
        fake = nets.G(inputs.gen_z, inputs.gen_c)
        if phase.name == "Gmain":
            logits = self._d(nets, fake, inputs.gen_c, inputs)
            loss = -logits.mean() if hinge else F.softplus(-logits).mean()
            stats = {"Loss/G/loss": loss.detach()}
            if self.cfg.feature_matching > 0:
                f = nets["features"]
                matching = (f(inputs.real_img).mean(0) - f(fake).mean(0)).square().sum()
                loss = loss + self.cfg.feature_matching * matching
                stats["Loss/G/feature_matching"] = matching.detach()
            return loss, stats
        if phase.name == "Info":
            codes = inputs.gen_z[:, -self.info_dim :]
            info = (nets["Q"](fake) - codes).square().mean()  # -log q(code | x) of a unit Gaussian, up to constants
            return info * self.cfg.info_weight, {"Loss/info": info.detach()}
        raise ValueError(f"no phase {phase.name!r}")


DCGAN = register_family(
    Family(
        name="dcgan",
        model_config=DCGANConfig,
        loss_config=DCGANLossConfig,
        build_generator=lambda spec: Generator(spec.model, spec.resolution),
        build_discriminator=lambda spec: Discriminator(spec.model, spec.resolution),
        build_objective=lambda cfg: DCGANObjective(cfg.loss, cfg.model.info_dim),
        build_conditioning=conditioning,
        build_extra=lambda spec: {"Q": InfoQ(spec.model, spec.resolution)} if spec.model.info_dim else {},
        build_frozen=lambda cfg: {"features": random_features()} if cfg.loss.feature_matching > 0 else {},
        init_ignore_keys=frozenset({"prompts"}),
    )
)

# ----------------------------------------------------------------------------------------------------------------
# Tests

STEPS_PER_KIMG = 1000 // 8


def write_recipe(tmp_path: Path, **sections: dict[str, Any]) -> str:
    """A dcgan recipe: 16px synthetic shapes, batch 8, nothing written that the test does not read."""
    recipe: dict[str, Any] = {
        "family": "dcgan",
        "run_dir": str(tmp_path / "run"),
        "data": {"resolution": 16, "batch_size": 8, "num_workers": 0, "cache_dir": str(tmp_path / "cache"),
                 "synth": {"n": 64}},
        "model": {"z_dim": 16, "channels": 16},
        "optim": {"g_lr": 0.002, "d_lr": 0.002, "betas": [0.5, 0.99]},
        "train": {"total_kimg": 0.048, "checkpoint_every_kimg": 0.024, "samples_every_kimg": 1, "progress_bar": False,
                  "ema_kimg": 0.02, "log_every_kimg": 0.016},
        "logger": {"csv": False},
        "eval": {"metrics": []},
    }  # fmt: skip
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    path = tmp_path / "dcgan.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_the_record_is_registered_and_its_sections_are_checked(tmp_path: Path) -> None:
    assert get_family("dcgan") is DCGAN
    cfg = load_config(write_recipe(tmp_path), ["loss.kind=hinge", "model.c_dim=6"])
    assert isinstance(cfg.model, DCGANConfig) and cfg.loss.kind == "hinge" and cfg.loss.d_steps == 2
    with pytest.raises(Exception, match=r"unknown config key 'loss\.dsteps'; did you mean loss\.d_steps"):
        load_config(write_recipe(tmp_path), ["loss.dsteps=3"])
    with pytest.raises(Exception, match=r"auto\.gpus is set but family 'dcgan' has no auto rule"):
        load_config(write_recipe(tmp_path), ["auto.gpus=2"])


def test_trains_resumes_exactly_exports_generates_and_evaluates(tmp_path: Path, capsys) -> None:
    """Unconditional, non-saturating, 2 D steps per G step, through `ganpipe train/export/generate/eval`."""
    recipe = write_recipe(tmp_path)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main(["train", recipe, f"run_dir={full}"]) == 0
    # Interrupted after 3 steps (G has stepped once, mid-way through its second D pair), then resumed.
    assert main(["train", recipe, f"run_dir={split}", "train.total_kimg=0.024"]) == 0
    assert main(["train", recipe, f"run_dir={split}", "--resume", "auto"]) == 0
    expected, resumed = (load_checkpoint(list_checkpoints(d)[-1]) for d in (full, split))
    assert expected["counters"] == resumed["counters"] == {"cur_nimg": 48, "step_idx": 6, "ema_nimg": 48}
    _assert_states_equal(expected, resumed, ("G", "D", "G_ema"))
    opt_g, opt_d = expected["optimizers"]
    assert {int(s["step"]) for s in opt_g["state"].values()} == {3}  # 6 real batches: 6 D steps, 3 G steps
    assert {int(s["step"]) for s in opt_d["state"].values()} == {6}
    assert expected["data"]["samples_seen"] == 48
    assert any("running_mean" in k for k in expected["G_ema"])  # BatchNorm statistics travel with G_ema

    export = str(tmp_path / "export")
    assert main(["export", full, "--out", export]) == 0
    meta = json.loads(Path(export, "generator.json").read_text())
    assert meta["family"] == "dcgan" and meta["conditioning"] == {"kind": "none"} and meta["z_dim"] == 16
    grid = tmp_path / "grid.png"
    assert main(["generate", export, "--seeds", "0-5", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (3 * 16, 2 * 16)
    capsys.readouterr()
    # The base sampler has no truncation, noise or styles: asked for, they are refused in one line.
    for flags in (["--trunc", "0.7"], ["--noise-mode", "random"], ["--style-mix", "1", "2"]):
        assert main(["generate", export, *flags, "--out", str(grid)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not available for dcgan generators" in err, err
    for source in (export, full, list_checkpoints(full)[-1]):  # an export, a run dir, a checkpoint
        assert main(["generate", source, "--help"]) == 0
        usage = capsys.readouterr().out
        assert "--interp-space {z}" in usage and "--seeds" in usage
        assert not re.search(r"--trunc\b|--noise-mode|--style-mix|--class|--prompt", usage), usage

    # No --data: the synthetic set the run trained on is found from the run's config.
    assert main(["eval", full, "--metrics", "fid16_full", "--extractor", "small", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["results"]["fid16_full"] > 0 and record["kimg"] == 0.048
    _exported_programs_match(export, tmp_path, capsys)  # BatchNorm in eval mode, the base sampler's graph


def _exported_programs_match(export: str, tmp_path: Path, capsys, *request: str) -> None:
    """The family's round trip through ONNX and torch.export (verified against PyTorch by the exporter itself), and
    `generate --runtime onnxruntime` drawing what the torch runtime draws."""
    capsys.readouterr()
    assert main(["export", export, "--out", export, "--format", "onnx,pt2"]) == 0
    formats = json.loads(Path(export, "generator.json").read_text())["formats"]
    for fmt in ("onnx", "pt2"):
        assert formats[fmt]["verified"]["max_abs_diff"] < 1e-4 and formats[fmt]["verified"]["batch_sizes"] == [4, 1]
    grids = {}
    for runtime in ("torch", "onnxruntime"):
        grids[runtime] = np.asarray(Image.open(_generate(export, tmp_path / runtime, runtime, *request)), dtype=int)
    assert np.abs(grids["torch"] - grids["onnxruntime"]).max() <= 1


def _generate(export: str, out: Path, runtime: str, *request: str) -> Path:
    assert main(["generate", export, "--runtime", runtime, "--seeds", "0-5", *request, "--out", f"{out}.png"]) == 0
    return Path(f"{out}.png")


def _assert_states_equal(expected: dict[str, Any], resumed: dict[str, Any], nets: tuple[str, ...]) -> None:
    for net in nets:
        assert expected[net].keys() == resumed[net].keys()
        for key, value in expected[net].items():
            assert torch.equal(resumed[net][key], value), f"{net}.{key}"
    assert len(expected["optimizers"]) == len(resumed["optimizers"])
    for opt_e, opt_r in zip(expected["optimizers"], resumed["optimizers"], strict=True):
        for idx, state in opt_e["state"].items():
            for name, value in state.items():
                assert torch.equal(opt_r["state"][idx][name], value), f"optimizer state {idx}.{name}"


def test_classes_hinge_extra_and_frozen_networks(tmp_path: Path, capsys) -> None:
    """Class labels by embedding index, hinge loss with R1, a third trained network (Q) and a frozen one; a run
    with all of them resumes exactly."""
    recipe = write_recipe(
        tmp_path,
        model={"z_dim": 16, "channels": 16, "c_dim": 6, "info_dim": 2},
        loss={"kind": "hinge", "r1_gamma": 1.0, "feature_matching": 0.1},
        train={"total_kimg": 0.032, "progress_bar": False, "log_every_kimg": 0.008, "checkpoint_every_kimg": 0.016},
        logger={"csv": True},
    )
    run, split = str(tmp_path / "run"), str(tmp_path / "split")
    assert main(["train", recipe]) == 0
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["extra_networks"] == ["Q"] and "Q" in state and len(state["optimizers"]) == 3
    assert {int(s["step"]) for s in state["optimizers"][2]["state"].values()} == {2}  # Q trains with G
    # The frozen feature net is in no checkpointed state: G, D, G_ema and Q hold exactly their own tensors.
    for net, module in (("G", Generator), ("D", Discriminator), ("Q", InfoQ)):
        cfg = DCGANConfig(z_dim=16, channels=16, c_dim=6, info_dim=2)
        assert state[net].keys() == module(cfg, 16).state_dict().keys()
    assert state["G"]["embed.weight"].shape == (6, 16)
    assert main(["train", recipe, f"run_dir={split}", "train.total_kimg=0.016"]) == 0
    assert main(["train", recipe, f"run_dir={split}", "--resume", "auto"]) == 0
    _assert_states_equal(state, load_checkpoint(list_checkpoints(split)[-1]), ("G", "D", "G_ema", "Q"))
    capsys.readouterr()
    assert main(["train", recipe, f"run_dir={split}", "model.info_dim=0", "train.total_kimg=0.048", "--resume",
                 "auto"]) == 2  # fmt: skip
    assert "was trained with a different 'model'" in capsys.readouterr().err
    without_q = GANTask(load_config(recipe, ["model.info_dim=0"]))  # the engine's own check, behind the config's
    with pytest.raises(CheckpointError, match=r"trains the extra networks \['Q'\] but this config builds \[\]"):
        without_q.load_training_state(state)
    with open(f"{run}/logs/metrics.csv") as fh:
        header = fh.readline()
    assert "Loss/info" in header and "Loss/G/feature_matching" in header

    export = str(tmp_path / "export")
    assert main(["export", run, "--out", export]) == 0
    meta = json.loads(Path(export, "generator.json").read_text())
    assert meta["conditioning"] == {"kind": "class", "num_classes": 6, "encoding": "index"}
    out = tmp_path / "imgs"
    assert main(["generate", export, "--seeds", "0-1", "--class", "4", "--outdir", str(out)]) == 0
    a = Image.open(out / "seed0000.png").tobytes()
    assert main(["generate", export, "--seeds", "0-1", "--class", "1", "--outdir", str(out)]) == 0
    assert Image.open(out / "seed0000.png").tobytes() != a  # the class changes the image
    capsys.readouterr()
    assert main(["generate", export, "--seeds", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "class-conditional (6 classes): pass --class C" in capsys.readouterr().err
    _exported_programs_match(export, tmp_path, capsys, "--class", "4")  # an embedding of the class index


def test_text_conditioning_tokenizes_in_workers_and_exports_name_the_encoder(tmp_path: Path, capsys) -> None:
    prompts = ["a small red circle", "a large blue square"]
    recipe = write_recipe(
        tmp_path,
        data={"num_workers": 1},
        model={"z_dim": 16, "channels": 16, "text_dim": 8, "prompts": prompts},
        train={"total_kimg": 0.016, "progress_bar": False, "samples_every_kimg": 0.016},
    )
    assert main(["train", recipe]) == 0
    run = str(tmp_path / "run")
    state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["G"]["text.weight"].shape == (16, 8)
    assert not any("table" in k for net in ("G", "D", "G_ema") for k in state[net])  # the encoder is not stored
    assert Path(run, "samples", "fakes000000.png").exists()

    export = str(tmp_path / "export")
    assert main(["export", run, "--out", export]) == 0
    meta = json.loads(Path(export, "generator.json").read_text())
    assert meta["conditioning"] == {"kind": "text", "encoder": {"name": "hashed-bytes", "dim": 8, "seed": 0}}
    out = tmp_path / "imgs"
    images = []
    for prompt in prompts:
        assert main(["generate", export, "--seeds", "3", "--prompt", prompt, "--outdir", str(out)]) == 0
        images.append(Image.open(out / "seed0003.png").tobytes())
    assert images[0] != images[1]  # the prompt steers the image
    capsys.readouterr()
    assert main(["generate", export, "--seeds", "3", "--class", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--class is not available: this dcgan generator is text-conditional" in capsys.readouterr().err
    # The text encoder is a graph of its own: token ids (the tokenizer runs before it) -> the generator's inputs.
    _exported_programs_match(export, tmp_path, capsys, "--prompt", prompts[1])
    graphs = json.loads(Path(export, "generator.json").read_text())["formats"]["onnx"]["graphs"]
    assert graphs["text_encoder"]["files"] == ["text_encoder.onnx"]
    assert graphs["text_encoder"]["preprocessing"] == "ByteTokenizer(max_length=32)"
    assert [t["name"] for t in graphs["generator"]["inputs"]] == ["z", "text_tokens", "text_pooled", "text_mask"]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_the_data_workers_tokenize_captions(tmp_path: Path, start_method: str) -> None:
    """The transform runs in the workers however they start (spawn pickles it), and the encoder stays unbuilt
    until a batch is embedded."""
    url = ensure_synthetic_dataset(str(tmp_path), n=16, resolution=16, seed=0)
    cond = conditioning(DCGAN.spec({"text_dim": 8}, 16))
    loader, _ = build_train_stream(
        url, batch_size=4, seed=0, resolution=16, num_batches=2, steps_done=0, cur_nimg=0, num_workers=1,
        options=StreamOptions(), transform=cond.batch_transform(),
    )  # fmt: skip
    loader.start_method = start_method
    batch = next(iter(loader))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (4, 32)  # a tensor, from a worker
    expected = torch.from_numpy(ByteTokenizer(32)(batch["caption"]))
    assert torch.equal(batch["tokens"], expected)
    assert cond._encoder is None  # tokenizing needed no encoder
    text = cond.from_batch(batch, torch.device("cpu"))
    assert text.pooled.shape == (4, 8) and text.mask[:, 0].all()


class PinnedTask(GANTask):
    """Latents for the global batch from a generator seeded by (step, phase); each rank takes its rows."""

    def draw_latents(self, phase: Phase, n: int, real_c: Any) -> tuple[Tensor, None]:
        gen = torch.Generator().manual_seed(1000 * self.step_idx + self.phases.index(phase))
        z = torch.randn([n * self.world_size, self.z_dim], generator=gen)
        return z[self.global_rank * n : (self.global_rank + 1) * n], None


def _bn_train(cfg_dict: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(cfg.seed)
    task = PinnedTask(cfg)
    world = cfg.train.devices
    rank = int(os.environ.get("RANK", "0"))
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 256, [8, 3, 16, 16], generator=gen, dtype=torch.uint8) for _ in range(3)]
    per = 8 // world
    data = [{"image": b[rank * per : (rank + 1) * per], "label": torch.zeros(per, dtype=torch.long)} for b in batches]
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
def test_sync_batchnorm_two_ranks_equal_one_process(tmp_path: Path, sync_batchnorm: bool) -> None:
    common = ["train.accelerator=cpu", "loss.d_steps=1", "train.ema_rampup=null", "train.total_kimg=1"]
    single = load_config(write_recipe(tmp_path), [*common, "train.devices=1"])
    dist = load_config(
        write_recipe(tmp_path),
        [*common, "train.devices=2", "train.backend=gloo", f"train.sync_batchnorm={sync_batchnorm}"],
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.spawn(_bn_worker, args=(port, dist.to_dict(), out), nprocs=2, join=True)
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
    else:  # per-rank statistics: BatchNorm normalises half batches, so G's gradients and weights differ
        assert "G.fc.weight" in differ and "G.bn0.running_var" in differ


def test_a_family_outside_ganpipe_is_found_through_the_environment_or_an_entry_point(tmp_path: Path) -> None:
    here = Path(__file__).parent
    env = {**os.environ, "GANPIPE_FAMILIES": "test_dcgan_family", "PYTHONPATH": f"{here}:{REPO}"}
    cmd = [sys.executable, "-m", "pipeline.cli", "config", write_recipe(tmp_path), "loss.kind=hinge"]
    expected = {"kind": "hinge", "d_steps": 2, "r1_gamma": 0.0, "feature_matching": 0.0, "info_weight": 1.0}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert yaml.safe_load(out)["loss"] == expected
    env["GANPIPE_FAMILIES"] = "no_such_module"
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "GANPIPE_FAMILIES names 'no_such_module'" in bad.stderr
    # An installed package that declares the family as a `ganpipe.families` entry point (its dist-info on the path).
    site = tmp_path / "site"
    dist = site / "dcgan_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dcgan-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ganpipe.families]\ndcgan = test_dcgan_family\n")
    env = {**os.environ, "PYTHONPATH": f"{site}:{here}:{REPO}"}
    env.pop("GANPIPE_FAMILIES", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert yaml.safe_load(out)["loss"] == expected
    (dist / "entry_points.txt").write_text("[ganpipe.families]\ndcgan = no_such_plugin_module\n")
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "entry point 'dcgan' of package 'dcgan-plugin' fails to load" in bad.stderr


def test_the_design_doc_describes_every_field_of_the_record() -> None:
    """docs/design.md's "How to add a family" names every field a record has (this family filled them)."""
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## How to add a family", 1)[1].split("\n## ", 1)[0]
    missing = [f.name for f in fields(Family) if f"`{f.name}`" not in section]
    assert not missing, f"docs/design.md 'How to add a family' does not describe {missing}"
