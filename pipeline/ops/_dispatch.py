"""Backend selection shared by every op: turns the user's `impl` argument into the backend that will run.

Backends:
    'ref'    pure PyTorch, differentiable to any order, runs on every device.
    'triton' the fused Triton kernels (`pipeline.ops._triton_kernels`), registered as `torch.library` custom ops
             whose backward formulas are themselves custom ops, so they are differentiable twice. Runs on CUDA
             tensors, and on CPU tensors when the Triton interpreter is on (`TRITON_INTERPRET=1`, how CI tests it).
    'auto'   'triton' for CUDA tensors when Triton is installed, 'ref' everywhere else.

While a program is being exported (`torch.export`, `torch.onnx.export`: `torch.compiler.is_exporting()`), every op
runs its reference whatever was asked: an exported program then holds standard operators only and runs on any
runtime and device, without Triton.

The environment variable `GANPIPE_OPS_IMPL` overrides the argument globally: `GANPIPE_OPS_IMPL=ref` forces the
reference everywhere (useful to bisect a numerical problem to the fused kernels), `=triton` forces the kernels;
unset, empty or 'auto' leaves the argument in charge. The training entry point exports it from `ops.impl`.

A kernel that fails at run time (a Triton compile error, an unsupported GPU) does not crash training: the op
computes the same result with the reference and `warn_fallback_once` emits a single `OpsFallbackWarning`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

ENV_VAR = "GANPIPE_OPS_IMPL"
IMPLS = ("auto", "ref", "triton")


class OpsBackendUnavailable(RuntimeError):
    """A backend was requested (by argument or by `GANPIPE_OPS_IMPL`) that cannot run on the given tensor."""


class OpsFallbackWarning(RuntimeWarning):
    """A Triton kernel failed at run time and the op fell back to the reference."""


def triton_installed() -> bool:
    """Whether the `triton` package can be imported (it is absent from CPU-only torch wheels on some platforms)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`); read when a kernel is first built."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """None when the Triton backend can run on `x`, else a one-line reason."""
    if not triton_installed():
        return "the triton package is not installed"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and triton_interpreter_on():
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got a {x.device.type} tensor"


def exporting() -> bool:
    """Whether a program is being traced for export (see the module docstring)."""
    return torch.compiler.is_exporting()


def resolve_impl(impl: str, x: torch.Tensor, kernel_limit: str | None = None) -> str:
    """Return the backend ('ref' or 'triton') that runs an op called with `impl` on input `x`; `kernel_limit`
    is why the op's kernel does not take this call's arguments (None: it does), so 'auto' picks 'ref'.

    Raises `ValueError` for an unknown name (in the argument or the environment variable) and
    `OpsBackendUnavailable` when 'triton' is requested explicitly but cannot run on `x` or these arguments.
    """
    assert isinstance(x, torch.Tensor)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if exporting():
        return "ref"
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced not in ("", *IMPLS):
        raise ValueError(f"environment variable {ENV_VAR} must be one of {IMPLS} or empty, got {forced!r}")
    if forced not in ("", "auto"):
        impl = forced
    if impl == "ref":
        return "ref"
    if impl == "auto":
        # Only CUDA tensors benefit; the interpreter is a test vehicle, orders of magnitude slower than 'ref'.
        return "triton" if x.device.type == "cuda" and triton_installed() and kernel_limit is None else "ref"
    reason = triton_unavailable_reason(x) or kernel_limit
    if reason is not None:
        raise OpsBackendUnavailable(
            f"impl='triton' cannot run: {reason}; use impl='ref' or impl='auto'"
            + (f" (it was requested through {ENV_VAR})" if forced == "triton" else "")
        )
    return "triton"


_fallback_warned = False


def warn_fallback_once(op: str, err: BaseException) -> None:
    """Emit one `OpsFallbackWarning` per process for the first Triton failure; later failures are silent.

    Under an "error" warnings filter (the test suite's, `python -W error::pipeline.ops.OpsFallbackWarning`) the
    warning raises instead, and then it does not count as emitted: every later failure raises as well, so that
    one failing test cannot make the next kernel failure silent."""
    global _fallback_warned
    if _fallback_warned:
        return
    warnings.warn(
        f"pipeline.ops: the Triton kernel of {op} failed ({type(err).__name__}: {err}); falling back to the "
        f"PyTorch reference for this and every later failing call (set {ENV_VAR}=ref to silence this)",
        OpsFallbackWarning,
        stacklevel=3,
    )
    _fallback_warned = True  # only once the warning was shown (or recorded), not when a filter made it raise


def reset_fallback_warning() -> None:
    """Re-arm `warn_fallback_once` (for tests)."""
    global _fallback_warned
    _fallback_warned = False
