"""End to end through the fused ops (Triton interpreter on CPU): a StyleGAN2 G and D at 32px give the reference's
outputs, losses, R1 and path-length gradients; a few steps of the tiny recipe give the same loss curve."""

from __future__ import annotations

import csv

import pytest
import torch

from pipeline.models.stylegan2 import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    MappingConfig,
    StyleGAN2Config,
    SynthesisConfig,
)
from pipeline.objectives.regularizers import r1_penalty
from pipeline.ops._dispatch import ENV_VAR

pytestmark = pytest.mark.usefixtures("interpreter")


def _cfg() -> StyleGAN2Config:
    return StyleGAN2Config(
        z_dim=16,
        w_dim=16,
        mapping=MappingConfig(num_layers=2),
        synthesis=SynthesisConfig(architecture="skip", channel_base=128, channel_max=8),
        discriminator=DiscriminatorConfig(architecture="resnet", channel_base=128, channel_max=8),
    )


def _losses_and_grads(G, D, z, real, impl, monkeypatch):
    """G(z), D(G(z)), the non-saturating losses, R1 at the reals and every parameter gradient, with `impl`."""
    monkeypatch.setenv(ENV_VAR, impl)
    for p in [*G.parameters(), *D.parameters()]:
        p.grad = None
    torch.manual_seed(123)  # the same noise inputs in both runs
    img = G(z, None, noise_mode="random")
    fake_logits = D(img, None)
    loss_g = torch.nn.functional.softplus(-fake_logits).mean()
    real = real.detach().requires_grad_()
    real_logits = D(real, None)
    r1 = r1_penalty(real, real_logits).mean()  # double backward through every op of D
    loss_d = torch.nn.functional.softplus(real_logits).mean() + 5.0 * r1
    (loss_g + loss_d).backward()
    grads = {name: p.grad.clone() for name, p in [*G.named_parameters(), *D.named_parameters()] if p.grad is not None}
    return img.detach(), fake_logits.detach(), loss_g.detach(), r1.detach(), grads


@pytest.mark.parametrize("train_mode", [True, False], ids=["train_nonfused", "eval_fused"])
def test_stylegan2_32px_same_outputs_losses_and_r1_gradients(train_mode, monkeypatch):
    torch.manual_seed(0)
    cfg = _cfg()
    G, D = Generator(cfg, 32).train(train_mode), Discriminator(cfg, 32).train(train_mode)
    z = torch.randn(2, cfg.z_dim)
    real = torch.randn(2, 3, 32, 32)
    ref = _losses_and_grads(G, D, z, real, "ref", monkeypatch)
    fused = _losses_and_grads(G, D, z, real, "triton", monkeypatch)
    for name, a, b in zip(["img", "logits", "loss_G", "r1"], ref[:4], fused[:4], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert ref[4].keys() == fused[4].keys() and len(ref[4]) > 20
    for name in ref[4]:
        torch.testing.assert_close(
            fused[4][name], ref[4][name], rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_path_length_gradient_through_fused_synthesis(monkeypatch):
    """d/dw of <G.synthesis(w), y>, differentiated again with respect to the weights (path-length regularisation)."""
    torch.manual_seed(0)
    cfg = _cfg()
    G = Generator(cfg, 16).double().train()
    ws = torch.randn(2, G.num_ws, cfg.w_dim, dtype=torch.float64)
    y = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    results = []
    for impl in ("ref", "triton"):
        monkeypatch.setenv(ENV_VAR, impl)
        G.zero_grad(set_to_none=True)
        w = ws.clone().requires_grad_()
        img = G.synthesis(w, noise_mode="const")
        (gw,) = torch.autograd.grad((img * y).sum(), w, create_graph=True)
        gw.square().sum().backward()
        results.append({n: p.grad.clone() for n, p in G.synthesis.named_parameters() if p.grad is not None})
    # The parameters are float64 but the synthesis runs its activations in float32 (as NVIDIA's does), and the
    # fused epilogue rounds once where the reference rounds after each op: float32 tolerances.
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-4)


def _loss_curve(cfg) -> dict[str, list[float]]:
    """Each loss's logged values, in step order (a lazily run phase's loss only in the rows of steps it ran)."""
    from pipeline.train import train

    train(cfg)
    with open(f"{cfg.run_dir}/logs/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = ("Loss/G/loss", "Loss/D/loss", "Loss/r1_penalty", "Loss/pl_penalty")
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in keys}


def test_tiny_recipe_same_loss_curve_with_ref_and_triton(make_config, tmp_path, monkeypatch):
    """Two training steps of the tiny recipe (every phase: G main, lazy path length, D main, R1) with ops.impl=ref,
    then ops.impl=triton under the interpreter: the same logged losses. The train entry point exports
    GANPIPE_OPS_IMPL; monkeypatch restores it afterwards."""
    monkeypatch.setenv(ENV_VAR, "auto")
    overrides = [
        "data.batch_size=4",
        "model.synthesis.channel_max=8",
        "model.discriminator.channel_max=8",
        "train.total_kimg=0.008",
        "logger.csv=true",
        "train.log_every_kimg=0.004",
        "loss.d_reg_interval=1",
        "loss.pl_weight=2",
        "loss.g_reg_interval=2",
    ]
    curves = []
    for impl in ("ref", "triton"):
        cfg = make_config(*overrides, f"ops.impl={impl}", f"run_dir={tmp_path / impl}")
        curves.append(_loss_curve(cfg))
    # two steps: G, D and R1 (every step) twice, path length (every second step) once
    assert [len(v) for v in curves[0].values()] == [2, 2, 2, 1], curves
    for key, ref in curves[0].items():
        torch.testing.assert_close(torch.tensor(curves[1][key]), torch.tensor(ref), rtol=1e-4, atol=1e-5)
