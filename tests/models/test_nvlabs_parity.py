"""Our StyleGAN2 reproduces NVIDIA's: same parameter names, same outputs from the same weights.

The fixture holds tensors only: weights of small networks built by NVIDIA's public StyleGAN2-ADA code
(`training/networks.py`, run outside this project on the CPU reference ops, eval mode) with the inputs and the
outputs it produced. Loading them with `strict=True` proves the naming; comparing outputs proves the math.
tools/fixtures/make_nvlabs_stylegan2_fixture.py makes the fixture from a checkout of NVIDIA's repository, importing
its code from there at run time (see that script's docstring for the command line).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.models.stylegan2 import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    MappingConfig,
    StyleGAN2Config,
    SynthesisConfig,
)

FIXTURE = Path(__file__).parent / "fixtures" / "nvlabs_stylegan2_small.safetensors"


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize(("g_arch", "d_arch"), [("skip", "resnet"), ("resnet", "skip"), ("orig", "orig")])
def test_outputs_match_nvlabs(g_arch: str, d_arch: str) -> None:
    with safe_open(str(FIXTURE), "pt") as fh:
        meta = json.loads(fh.metadata()["config"])
    tensors = load_file(str(FIXTURE))
    tag = f"{g_arch}_{d_arch}"
    cfg = StyleGAN2Config(
        z_dim=meta["z_dim"],
        w_dim=meta["w_dim"],
        c_dim=meta["c_dim"],
        mapping=MappingConfig(num_layers=meta["map_layers"]),
        synthesis=SynthesisConfig(
            architecture=g_arch,
            channel_base=meta["channel_base"],
            channel_max=meta["channel_max"],
            conv_clamp=meta["conv_clamp"],
        ),
        discriminator=DiscriminatorConfig(
            architecture=d_arch,
            channel_base=meta["channel_base"],
            channel_max=meta["channel_max"],
            conv_clamp=meta["conv_clamp"],
        ),
    )
    resolution = tensors[f"{tag}/real"].shape[-1]
    G, D = Generator(cfg, resolution).eval(), Discriminator(cfg, resolution).eval()
    G.load_state_dict(_section(tensors, f"{tag}/G/"), strict=True)
    D.load_state_dict(_section(tensors, f"{tag}/D/"), strict=True)
    z, c = tensors[f"{tag}/z"], tensors[f"{tag}/c"]
    with torch.no_grad():
        for psi in ("1", "0.7"):
            for fused in (True, False):
                ours = G(z, c, truncation_psi=float(psi), noise_mode="const", fused_modconv=fused)
                torch.testing.assert_close(ours, tensors[f"{tag}/G_out_psi{psi}"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(D(tensors[f"{tag}/real"], c), tensors[f"{tag}/D_out"], rtol=1e-4, atol=1e-5)
