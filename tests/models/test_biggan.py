"""BigGAN's building blocks and networks against independent oracles: spectral norm against the SVD
(`torch.linalg.svdvals`), conditional BN and self-attention against their formulas written out naively, network
sizes against the published parameter counts, the truncation trick against scipy's truncated normal, standing
statistics against the mean of per-batch statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.biggan import BigGANConfig, Discriminator, Generator, apply_standing_statistics
from pipeline.models.biggan_sampling import BigGANOptions, BigGANSampler, truncated_latents
from pipeline.models.conditioning import ClassConditioning, Request
from pipeline.nn import ConditionalBatchNorm2d, SelfAttention2d, SNConv2d, SNEmbedding, SNLinear
from pipeline.train.ema import update_ema


def _top_singular_value(w: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(w.detach().reshape(w.shape[0], -1).double())[0])


@pytest.mark.parametrize("layer", ["linear", "conv", "embedding"])
def test_power_iteration_converges_to_the_top_singular_value(layer: str) -> None:
    torch.manual_seed(0)
    m = {"linear": lambda: SNLinear(24, 16), "conv": lambda: SNConv2d(6, 10), "embedding": lambda: SNEmbedding(7, 12)}[
        layer
    ]()
    x = torch.randint(7, [4]) if layer == "embedding" else torch.randn(4, 6, 5, 5) if layer == "conv" else None
    x = torch.randn(4, 24) if x is None else x
    for _ in range(60):
        m(x)
    sigma = _top_singular_value(m.weight)
    assert abs(float(m.sv0) - sigma) < 1e-4 * sigma
    assert abs(_top_singular_value(m.normalized_weight().detach()) - 1) < 1e-4
    # Eval mode divides by the stored sigma and moves nothing.
    u0 = m.u0.clone()
    m.eval()
    torch.testing.assert_close(m.normalized_weight(), m.weight / m.sv0)
    assert torch.equal(m.u0, u0)


def test_several_power_iterations_per_pass_equal_as_many_passes() -> None:
    torch.manual_seed(0)
    one, three = SNLinear(9, 5), SNLinear(9, 5, num_itrs=3)
    three.load_state_dict(one.state_dict())
    x = torch.randn(2, 9)
    for _ in range(3):
        one(x)
    three(x)
    torch.testing.assert_close(three.u0, one.u0)
    torch.testing.assert_close(three.sv0, one.sv0)


def test_sigma_gradient_matches_the_svd_and_survives_several_passes_before_backward() -> None:
    """At convergence the gradient through W / sigma(W) equals autograd through the exact SVD; calling the layer
    twice before one backward (gradient accumulation, fakes and reals) works and sums both passes' gradients."""
    torch.manual_seed(1)
    m = SNLinear(12, 8, bias=False)
    x = torch.randn(5, 12)
    with torch.no_grad():
        for _ in range(200):
            m(x)
    (m(x).square().sum() + m(2 * x).sum()).backward()
    w = m.weight.detach().clone().requires_grad_(True)
    w_sn = w / torch.linalg.svdvals(w)[0]
    ((x @ w_sn.t()).square().sum() + (2 * x @ w_sn.t()).sum()).backward()
    torch.testing.assert_close(m.weight.grad, w.grad, atol=1e-5, rtol=1e-4)


def test_ema_refresh_estimates_sigma_of_the_averaged_weights_without_moving_u() -> None:
    torch.manual_seed(2)
    G, G_ema = SNLinear(10, 6), SNLinear(10, 6)
    for _ in range(50):
        G(torch.randn(3, 10))
    with torch.no_grad():
        G_ema.weight.copy_(G.weight * 1.5)  # as if averaged toward larger weights
    update_ema(G_ema, G, beta=1.0)  # parameters kept, buffers copied from G, then refreshed
    assert torch.equal(G_ema.u0, G.u0)
    assert abs(float(G_ema.sv0) - _top_singular_value(G_ema.weight)) < 1e-3 * float(G_ema.sv0)


def test_conditional_batch_norm_is_its_formula() -> None:
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(5, 7, eps=1e-4)
    x, y = torch.randn(6, 5, 3, 3), torch.randn(6, 7)
    out = cbn(x, y)
    mean = x.mean(dim=[0, 2, 3], keepdim=True)
    var = x.var(dim=[0, 2, 3], unbiased=False, keepdim=True)
    gain = 1 + y @ cbn.gain.weight.t()
    bias = y @ cbn.bias.weight.t()
    expected = (x - mean) / torch.sqrt(var + 1e-4) * gain[:, :, None, None] + bias[:, :, None, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    cbn.eval()  # running statistics, one momentum step from (0, 1)
    run_mean, run_var = 0.1 * mean.flatten(), 0.9 + 0.1 * x.var(dim=[0, 2, 3], unbiased=True)
    expected = (x - run_mean[:, None, None]) / torch.sqrt(run_var[:, None, None] + 1e-4)
    torch.testing.assert_close(cbn(x, y), expected * gain[:, :, None, None] + bias[:, :, None, None])


def test_truncation_statistics_blend_rows_as_the_release_does() -> None:
    cbn = ConditionalBatchNorm2d(3, None, n_stats=51)
    cbn.truncation_means.copy_(torch.arange(51.0)[:, None].expand(51, 3))
    mean, _ = cbn.truncation_statistics(0.555)  # 0.555 / 0.02 = 27.75: rows 27 and 28, weights 0.75 and 0.25
    torch.testing.assert_close(mean, torch.full([3], 27 * 0.75 + 28 * 0.25))
    assert torch.equal(cbn.truncation_statistics(0.4)[0], torch.full([3], 20.0))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cbn.truncation_statistics(1.5)


def test_self_attention_is_its_formula() -> None:
    torch.manual_seed(0)
    att = SelfAttention2d(16, lambda i, o, **kw: nn.Conv2d(i, o, **kw))
    x = torch.randn(2, 16, 4, 6)
    assert torch.equal(att(x), x)  # gamma starts at 0
    with torch.no_grad():
        att.gamma.fill_(0.7)
    out = att(x)
    # Per query pixel i: softmax over the pooled key pixels j of <theta_i, phi_j>, then o(sum_j beta_ij g_j).
    theta = att.theta(x).flatten(2)  # [N, 2, 24]
    phi = F.max_pool2d(att.phi(x), 2).flatten(2)  # [N, 2, 6]
    g = F.max_pool2d(att.g(x), 2).flatten(2)  # [N, 8, 6]
    expected = torch.empty_like(x)
    for n in range(2):
        pixels = []
        for i in range(24):
            beta = torch.softmax(torch.stack([theta[n, :, i] @ phi[n, :, j] for j in range(6)]), 0)
            pixels.append(sum(beta[j] * g[n, :, j] for j in range(6)))
        o = att.o(torch.stack(pixels, 1).view(1, 8, 4, 6))
        expected[n] = x[n] + 0.7 * o[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_published_parameter_counts() -> None:
    """BigGAN at 128 px, ch 96: 158.3M parameters in G and D together (Brock et al. 2019, Table 1; ours: G 70.43M
    + D 87.98M = 158.42M, within the table's rounding of its own count). BigGAN-deep 256, ch 128: 55.9M in the
    public release (pytorch-pretrained-BigGAN README), which holds a 128-output conv_to_rgb (of which 3 rows are
    used: 125 x 128 x 9 + 125 weights fewer here)."""
    torch.manual_seed(0)
    with torch.device("meta"):  # shapes only: no 70M-parameter orthogonal init
        cfg = BigGANConfig(ch=96, c_dim=1000)
        g = sum(p.numel() for p in Generator(cfg, 128).parameters())
        d = sum(p.numel() for p in Discriminator(cfg, 128).parameters())
        deep = BigGANConfig(architecture="deep", ch=128, z_dim=128, c_dim=1000)
        g_deep = sum(p.numel() for p in Generator(deep, 256).parameters())
    assert abs((g + d) / 1e6 - 158.3) < 0.15 and round(g / 1e6, 1) == 70.4
    assert round((g_deep + 125 * 128 * 9 + 125) / 1e6, 1) == 55.9


@pytest.mark.parametrize("architecture", ["biggan", "deep"])
@pytest.mark.parametrize("resolution", [32, 64])
def test_networks_shapes_and_class_dependence(architecture: str, resolution: int) -> None:
    """(128-512 px: the converter tests run BigGAN-PyTorch's and the release's 128 and 256 px layouts.)"""
    torch.manual_seed(0)
    z_dim = {32: 80, 64: 120}[resolution] if architecture == "biggan" else 32
    attention = [16] if resolution >= 64 else []
    cfg = BigGANConfig(architecture=architecture, ch=4, z_dim=z_dim, shared_dim=8, c_dim=5,
                       g_attention=attention, d_attention=attention)  # fmt: skip
    G, D = Generator(cfg, resolution).eval(), Discriminator(cfg, resolution)
    z = torch.randn(3, z_dim)
    img = G(z, torch.tensor([0, 1, 2]))
    assert img.shape == (3, 3, resolution, resolution) and img.abs().max() <= 1
    assert not torch.allclose(img, G(z, torch.tensor([3, 3, 3])))  # the class steers G
    assert D(img, torch.tensor([0, 1, 2])).shape == (3, 1)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model.z_dim=100 is invalid: hier=true at 128 px splits z into 6"):
        BigGANConfig(z_dim=100).check_resolution(128)
    with pytest.raises(ConfigError, match=r"model.g_attention=\[48\] is invalid: choose among"):
        BigGANConfig(g_attention=[48]).check_resolution(128)
    with pytest.raises(ConfigError, match="self-attention needs >= 8 channels"):
        BigGANConfig(ch=4, d_attention=[64]).check_resolution(128)
    with pytest.raises(ConfigError, match="data.resolution=48"):
        BigGANConfig().check_resolution(48)


def test_truncated_latents_follow_scipys_truncated_normal() -> None:
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    t = truncated_latents(z, 0.4)
    assert t.abs().max() <= 0.8
    qs = np.linspace(0.01, 0.99, 25)
    expected = 0.4 * scipy.stats.truncnorm.ppf(qs, -2, 2)
    np.testing.assert_allclose(np.quantile(t.numpy(), qs), expected, atol=4e-3)
    assert torch.equal(truncated_latents(z[:5], 1.0).sign(), z[:5].sign())  # monotone: a seed keeps its image


def _tiny_generator(**kw: object) -> Generator:
    torch.manual_seed(0)
    return Generator(BigGANConfig(ch=8, z_dim=32, shared_dim=8, c_dim=4, g_attention=[], d_attention=[], **kw), 32)


def test_standing_statistics_are_the_mean_of_per_batch_statistics() -> None:
    G = _tiny_generator(standing_batch=6)
    G.eval()
    bn = G.output_layer[0].bn
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().mean(dim=[0, 2, 3])))
    u0 = G.linear.u0.clone()
    apply_standing_statistics(G, num_batches=3, batch_size=6)
    hook.remove()
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0))
    assert not G.training and not bn.training and bn.momentum == 0.1  # modes and momentum restored
    assert torch.equal(G.linear.u0, u0)  # spectral norms stayed in eval mode


def test_sampler_truncates_z_steers_by_class_and_keeps_g_ema_unchanged() -> None:
    G = _tiny_generator(standing_stats=2, standing_batch=4).eval()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    sampler = BigGANSampler(G, ClassConditioning(4, encoding="index"), "biggan")
    a = sampler.generate([1, 2], Request(class_idx=1), BigGANOptions(truncation=0.5))
    b = sampler.generate([1, 2], Request(class_idx=1), BigGANOptions(truncation=0.5))
    c = sampler.generate([1, 2], Request(class_idx=2), BigGANOptions(truncation=0.5))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    for k, v in G.state_dict().items():  # standing statistics ran on a copy
        assert torch.equal(v, before[k]), k
    z = sampler.latents([1, 2])
    with torch.no_grad():
        direct = sampler.generator()(truncated_latents(z, 0.5), torch.tensor([1, 1]))
    torch.testing.assert_close(a, direct)
