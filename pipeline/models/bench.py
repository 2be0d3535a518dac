"""Benchmark cases built from whole networks, for `pipeline.ops.bench` (which may not import models itself).

`synthesis_case(resolution, dtype, device)`: StyleGAN2's synthesis network with the paper256 widths
(channel_base 16384, channel_max 512), batch 32, forward + backward under autocast, timed with every op on
`impl='ref'` and then on `impl='triton'` (through `GANPIPE_OPS_IMPL`, restored after each call).
"""

from __future__ import annotations

import os

import torch

from pipeline.models.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig
from pipeline.ops._dispatch import ENV_VAR
from pipeline.ops.bench import Case


def synthesis_case(resolution: int, dtype: torch.dtype, device: str, batch: int = 32) -> Case:
    cfg = StyleGAN2Config(
        mapping=MappingConfig(num_layers=2),
        synthesis=SynthesisConfig(channel_base=16384, channel_max=512),
    )
    synthesis = Generator(cfg, resolution).synthesis.to(device).train()
    ws = torch.randn(batch, synthesis.num_ws, cfg.w_dim, device=device, requires_grad=True)
    inputs = [ws, *synthesis.parameters()]

    def make(impl: str):
        def forward() -> torch.Tensor:
            previous = os.environ.get(ENV_VAR)
            os.environ[ENV_VAR] = impl
            try:
                with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
                    return synthesis(ws, noise_mode="random")
            finally:
                if previous is None:
                    del os.environ[ENV_VAR]
                else:
                    os.environ[ENV_VAR] = previous

        return forward, inputs

    name = f"StyleGAN2 synthesis {resolution}px (paper256 widths)"
    return Case(name, f"batch {batch}", dtype, make, None)
