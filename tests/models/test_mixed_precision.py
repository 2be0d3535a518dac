"""Mixed precision: NVIDIA's float16 layers (`num_fp16_res`, `conv_clamp=256`) and bf16 autocast stay finite and
close to float32 over a few hundred training steps of a 64x64 model; R1 and path-length passes run in float32.

CPU notes: torch runs float16 convolutions on CPU (slowly, ~25x float32), so the float16-layer path is exercised
for real here with a narrow model; bf16 autocast (Lightning's `bf16-mixed`) is fast on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.models.stylegan2 import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    MappingConfig,
    StyleGAN2Config,
    SynthesisConfig,
    fp16_resolution,
)
from pipeline.objectives import Networks, Phase, PhaseInputs, StyleGAN2LossConfig, StyleGAN2Objective
from tests.conftest import TINY_RECIPE

RES = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # float16 convolutions on CPU crawl with several threads


def cfg64(num_fp16_res: int, channels: int = 8) -> StyleGAN2Config:
    return StyleGAN2Config(
        z_dim=16,
        w_dim=16,
        mapping=MappingConfig(num_layers=2),
        synthesis=SynthesisConfig(
            channel_base=channels * 32, channel_max=channels, conv_clamp=256, num_fp16_res=num_fp16_res
        ),
        discriminator=DiscriminatorConfig(
            channel_base=channels * 32, channel_max=channels, conv_clamp=256, num_fp16_res=num_fp16_res
        ),
    )


def test_fp16_blocks_are_the_top_resolutions() -> None:
    assert fp16_resolution(64, 0) == 128  # none
    assert fp16_resolution(64, 2) == 32
    assert fp16_resolution(64, 4) == 8  # never the 4x4 layers
    assert fp16_resolution(1024, 4) == 128  # NVIDIA's default: 128..1024
    G, D = Generator(cfg64(2), RES), Discriminator(cfg64(2), RES)
    assert [r for r in G.synthesis.block_resolutions if G.synthesis.get_submodule(f"b{r}").use_fp16] == [32, 64]
    assert [r for r in D.block_resolutions if D.get_submodule(f"b{r}").use_fp16] == [64, 32]


def test_activation_dtypes_and_force_fp32() -> None:
    torch.manual_seed(0)
    G, D = Generator(cfg64(4), RES), Discriminator(cfg64(4), RES)
    seen: dict[str, torch.dtype] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out[0].dtype))
        for name, m in [*G.synthesis.named_children(), *D.named_children()]
        if name.startswith("b")
    ]
    img = G(torch.randn(2, 16), None)
    logits = D(img, None)
    assert img.dtype == torch.float32 and logits.dtype == torch.float32
    assert seen["b4"] == torch.float32 and seen["b64"] == torch.float16 and seen["b8"] == torch.float16
    seen.clear()
    D(G(torch.randn(2, 16), None, force_fp32=True), None, force_fp32=True)
    assert set(seen.values()) == {torch.float32}
    for h in hooks:
        h.remove()


def test_precision_config_rules() -> None:
    cfg = load_config(TINY_RECIPE, ["model.synthesis.num_fp16_res=4", "model.discriminator.num_fp16_res=4"])
    assert cfg.model.synthesis.num_fp16_res == 4
    with pytest.raises(ConfigError, match=r"model.synthesis.num_fp16_res=4 is invalid: float16 layers need"):
        load_config(TINY_RECIPE, ["model.synthesis.num_fp16_res=4", "train.precision=bf16-mixed"])
    with pytest.raises(ConfigError, match=r"model.discriminator.num_fp16_res=-1 is invalid"):
        load_config(TINY_RECIPE, ["model.discriminator.num_fp16_res=-1"])


def _flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _phase_grads(obj, phase, G, D, inputs, seed, autocast: bool = False):
    """Loss, stats and the trained network's flat gradient of one phase, with a fixed RNG seed."""
    net = G if phase.net == "G" else D
    G.requires_grad_(phase.net == "G")
    D.requires_grad_(phase.net == "D")
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, stats = obj.phase_loss(phase, Networks(G, D), inputs)
    loss.backward()
    return loss.detach(), stats, _flat_grads(net)


def _train_and_compare(
    low_G, low_D, steps: int, compare_every: int, autocast: bool, loss_tol: float
) -> list[tuple[str, float, float]]:
    """Train the low-precision pair; every `compare_every` steps run the same phases (same weights, same seeds) in
    float32 and compare losses (relative tolerance `loss_tol`). Returns (phase, relative gradient error, gradient
    cosine similarity) of every comparison."""
    torch.manual_seed(0)
    ref_G, ref_D = Generator(cfg64(0), RES), Discriminator(cfg64(0), RES)
    ref_G.load_state_dict(low_G.state_dict())
    ref_D.load_state_dict(low_D.state_dict())
    obj = StyleGAN2Objective(
        StyleGAN2LossConfig(r1_gamma=1.0, d_reg_interval=16, pl_weight=2.0, g_reg_interval=8), batch_size=4
    )
    phases = obj.phases()
    opts = {
        "G": torch.optim.Adam(low_G.parameters(), lr=0.0025, betas=(0.0, 0.99)),
        "D": torch.optim.Adam(low_D.parameters(), lr=0.0025, betas=(0.0, 0.99)),
    }
    # 16 fixed smooth colour images: a small "dataset" that D can learn.
    reals = F.interpolate(torch.rand(16, 3, 8, 8) * 2 - 1, size=(RES, RES), mode="bilinear", align_corners=False)
    seen = []
    for step in range(steps):
        idx = torch.randint(0, 16, [4])
        for k, phase in enumerate(phases):
            if step % phase.interval:
                continue
            inputs = PhaseInputs(reals[idx], None, torch.randn(4, 16), None)
            seed = step * 10 + k
            pl_mean_before = obj.path_length.pl_mean.clone()
            loss, _, grads = _phase_grads(obj, phase, low_G, low_D, inputs, seed, autocast)
            assert torch.isfinite(loss) and torch.isfinite(grads).all(), f"step {step} {phase.name}"
            if step % compare_every == 0:
                ref_G.load_state_dict(low_G.state_dict())
                ref_D.load_state_dict(low_D.state_dict())
                pl_mean_after = obj.path_length.pl_mean.clone()
                obj.path_length.pl_mean.copy_(pl_mean_before)  # the reference sees the same running mean
                ref_loss, _, ref_grads = _phase_grads(obj, phase, ref_G, ref_D, inputs, seed)
                obj.path_length.pl_mean.copy_(pl_mean_after)
                assert abs(loss - ref_loss) <= loss_tol * max(1.0, abs(ref_loss)), (step, phase.name, loss, ref_loss)
                rel = ((grads - ref_grads).norm() / ref_grads.norm().clamp(min=1e-12)).item()
                seen.append((phase.name, rel, F.cosine_similarity(grads, ref_grads, dim=0).item()))
            opts[phase.net].step()
    return seen


def test_fp16_layers_train_finite_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    G, D = Generator(cfg64(4), RES), Discriminator(cfg64(4), RES)
    seen = _train_and_compare(G, D, steps=200, compare_every=20, autocast=False, loss_tol=0.02)
    print("fp16 vs fp32 (phase, rel. grad error, cosine):", seen)
    main = [rel for name, rel, _ in seen if name in ("Gmain", "Dmain")]
    assert max(main) < 0.1
    assert max(main) > 0  # float16 really was used: the gradients are not bit-identical
    assert all(rel == 0 for name, rel, _ in seen if name in ("Greg", "Dreg"))  # regularization runs in float32


def test_bf16_autocast_trains_finite_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    G, D = Generator(cfg64(0), RES), Discriminator(cfg64(0), RES)
    seen = _train_and_compare(G, D, steps=200, compare_every=20, autocast=True, loss_tol=0.05)
    print("bf16 autocast vs fp32 (phase, rel. grad error, cosine):", seen)
    # bfloat16 keeps 8 mantissa bits: single gradients can be noisy where terms cancel, the direction holds.
    cosines = [cos for _, _, cos in seen]
    assert min(cosines) > 0.5 and sum(cosines) / len(cosines) > 0.9


def test_regularization_passes_ignore_fp16_layers() -> None:
    """R1 and path length run with force_fp32: with float16 layers they equal the float32 model's exactly."""
    torch.manual_seed(0)
    G16, D16 = Generator(cfg64(4), RES), Discriminator(cfg64(4), RES)
    G32, D32 = Generator(cfg64(0), RES), Discriminator(cfg64(0), RES)
    G32.load_state_dict(G16.state_dict())
    D32.load_state_dict(D16.state_dict())
    obj = StyleGAN2Objective(StyleGAN2LossConfig(), batch_size=4)
    inputs = PhaseInputs(torch.rand(4, 3, RES, RES) * 2 - 1, None, torch.randn(4, 16), None)
    for phase in (Phase("Dreg", "D", 16, double_backward=True), Phase("Greg", "G", 4, double_backward=True)):
        pl_mean = obj.path_length.pl_mean.clone()
        l16, _, g16 = _phase_grads(obj, phase, G16, D16, inputs, seed=1)
        obj.path_length.pl_mean.copy_(pl_mean)
        l32, _, g32 = _phase_grads(obj, phase, G32, D32, inputs, seed=1)
        assert torch.equal(l16, l32) and torch.equal(g16, g32), phase.name
