"""Backend selection shared by every op: turns the user's `impl` argument into the backend that will run.

Backends: 'ref' (pure PyTorch, differentiable to any order, runs on every device) and 'triton' (the fused GPU
kernels, not built yet). 'auto' picks the fastest available backend for the input tensor; today that is 'ref'.
The environment variable `GANPIPE_OPS_IMPL` overrides the argument globally: `GANPIPE_OPS_IMPL=ref` forces the
reference everywhere (useful to bisect a numerical problem to the fused kernels); unset, empty or 'auto' leaves
the argument in charge.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "GANPIPE_OPS_IMPL"
IMPLS = ("auto", "ref", "triton")


class OpsBackendUnavailable(RuntimeError):
    """A backend was requested (by argument or by `GANPIPE_OPS_IMPL`) that is not available."""


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Return the backend ('ref') that runs an op called with `impl` on input `x`.

    Raises `ValueError` for an unknown name (in the argument or the environment variable) and
    `OpsBackendUnavailable` when the chosen backend cannot run.
    """
    assert isinstance(x, torch.Tensor)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced not in ("", *IMPLS):
        raise ValueError(f"environment variable {ENV_VAR} must be one of {IMPLS} or empty, got {forced!r}")
    if forced not in ("", "auto"):
        impl = forced
    if impl == "triton":
        raise OpsBackendUnavailable(
            "the fused Triton backend of pipeline.ops is not built yet; use impl='ref' or impl='auto'"
            + (f" (it was requested through {ENV_VAR})" if forced == "triton" else "")
        )
    # 'auto' will prefer 'triton' for CUDA tensors once it exists; until then every input runs the reference.
    return "ref"
