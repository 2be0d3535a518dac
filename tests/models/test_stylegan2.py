from __future__ import annotations

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
from pipeline.nn import MinibatchStdLayer


def small_cfg(g_arch: str = "skip", d_arch: str = "resnet", c_dim: int = 0) -> StyleGAN2Config:
    return StyleGAN2Config(
        z_dim=16,
        w_dim=16,
        c_dim=c_dim,
        mapping=MappingConfig(num_layers=2),
        synthesis=SynthesisConfig(architecture=g_arch, channel_base=256, channel_max=16),
        discriminator=DiscriminatorConfig(architecture=d_arch, channel_base=256, channel_max=16),
    )


@pytest.mark.parametrize("resolution", [8, 16, 32])
@pytest.mark.parametrize(("g_arch", "d_arch"), [("skip", "resnet"), ("resnet", "skip"), ("orig", "orig")])
def test_forward_backward_shapes_and_gradients(resolution: int, g_arch: str, d_arch: str) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(g_arch, d_arch, c_dim=3)
    G, D = Generator(cfg, resolution), Discriminator(cfg, resolution)
    z = torch.randn(4, cfg.z_dim)
    c = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    img = G(z, c)
    assert img.shape == (4, 3, resolution, resolution)
    logits = D(img, c)
    assert logits.shape == (4, 1)
    logits.sum().backward()
    for name, p in [*G.named_parameters(), *D.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Every parameter must matter (no dead layers): at least one nonzero gradient entry.
    dead = [n for n, p in G.named_parameters() if p.grad.abs().sum() == 0 and "noise_strength" not in n]
    assert not dead


def test_num_ws_and_nvidia_parameter_names() -> None:
    cfg = StyleGAN2Config(c_dim=10)
    G = Generator(cfg, 256)
    assert G.num_ws == 14  # 2 * log2(256) - 2, as in StyleGAN2
    names = set(G.state_dict())
    for expected in [
        "mapping.embed.weight",
        "mapping.fc0.weight",
        "mapping.fc7.bias",
        "mapping.w_avg",
        "synthesis.b4.const",
        "synthesis.b4.conv1.affine.weight",
        "synthesis.b4.conv1.noise_const",
        "synthesis.b4.conv1.noise_strength",
        "synthesis.b4.torgb.affine.bias",
        "synthesis.b8.conv0.weight",
        "synthesis.b256.torgb.weight",
        "synthesis.b8.resample_filter",
    ]:
        assert expected in names, expected
    D = Discriminator(cfg, 256)
    d_names = set(D.state_dict())
    for expected in [
        "b256.fromrgb.weight",
        "b256.conv0.weight",
        "b256.skip.weight",
        "b8.conv1.bias",
        "b4.conv.weight",
        "b4.fc.weight",
        "b4.out.weight",
        "mapping.embed.weight",
    ]:
        assert expected in d_names, expected
    # Channel schedule: min(32768 / res, 512).
    assert G.synthesis.b256.conv1.weight.shape == (128, 128, 3, 3)
    assert D.b4.fc.weight.shape == (512, 512 * 16)


def test_truncation_psi_zero_gives_average_w() -> None:
    torch.manual_seed(0)
    G = Generator(small_cfg(), 16)
    G.mapping.w_avg.copy_(torch.randn(16))
    ws = G.mapping(torch.randn(3, 16), None, truncation_psi=0.0)
    assert torch.allclose(ws, G.mapping.w_avg.expand_as(ws))
    ws_cut = G.mapping(torch.randn(3, 16), None, truncation_psi=0.0, truncation_cutoff=2)
    assert torch.allclose(ws_cut[:, :2], G.mapping.w_avg.expand(3, 2, 16))
    assert not torch.allclose(ws_cut[:, 2:], G.mapping.w_avg.expand(3, ws_cut.shape[1] - 2, 16))


def test_w_avg_tracks_the_mean_when_asked() -> None:
    torch.manual_seed(0)
    G = Generator(small_cfg(), 8)
    before = G.mapping.w_avg.clone()
    G.mapping(torch.randn(4, 16), None)
    assert torch.equal(G.mapping.w_avg, before)
    G.mapping(torch.randn(4, 16), None, update_emas=True)
    assert not torch.equal(G.mapping.w_avg, before)


def test_noise_modes_and_fused_modconv_agree() -> None:
    torch.manual_seed(0)
    G = Generator(small_cfg(), 16)
    for m in G.modules():
        if hasattr(m, "noise_strength"):
            m.noise_strength.data.fill_(0.5)
    z = torch.randn(2, 16)
    a = G(z, None, noise_mode="const", fused_modconv=True)
    b = G(z, None, noise_mode="const", fused_modconv=False)
    assert torch.allclose(a, b, atol=1e-5)
    r1, r2 = G(z, None, noise_mode="random"), G(z, None, noise_mode="random")
    assert not torch.allclose(r1, r2)
    assert torch.equal(G(z, None, noise_mode="none"), G(z, None, noise_mode="none"))


def test_minibatch_std_groups() -> None:
    x = torch.randn(8, 4, 2, 2)
    y = MinibatchStdLayer(group_size=4)(x)
    assert y.shape == (8, 5, 2, 2)
    # Sample n belongs to group n % (N / G): samples 0, 2, 4, 6 form one group.
    group = x[[0, 2, 4, 6]]
    expected = group.std(dim=0, unbiased=False).mean()
    assert torch.allclose(y[0, 4], expected.expand(2, 2), atol=1e-4)
    assert torch.allclose(y[0, 4], y[6, 4])
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 4, 2, 2))


def test_r1_double_backward_through_discriminator() -> None:
    torch.manual_seed(0)
    D = Discriminator(small_cfg(), 16)
    real = torch.randn(4, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(D(real, None).sum(), real, create_graph=True)
    penalty = grad.square().sum()
    penalty.backward()
    # R1 reaches every weight (biases of the last layer cannot affect d D / d x).
    for name, p in D.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
