"""The impl argument and GANPIPE_OPS_IMPL: on CPU 'auto'/'ref' run the reference; 'triton' runs the kernels under
the interpreter (TRITON_INTERPRET=1, set by conftest) and is a clear error without it."""

from __future__ import annotations

import pytest
import torch

from pipeline.ops import (
    OpsBackendUnavailable,
    bias_act,
    conv2d_resample,
    downsample2d,
    filter2d,
    modulated_conv2d,
    resolve_impl,
    setup_filter,
    upfirdn2d,
    upsample2d,
)
from pipeline.ops._dispatch import ENV_VAR

F = setup_filter([1, 3, 3, 1])
X = torch.randn(2, 4, 8, 8)
W = torch.randn(4, 4, 3, 3)
S = torch.randn(2, 4)

OPS = {
    "upfirdn2d": lambda impl: upfirdn2d(X, F, up=2, padding=1, impl=impl),
    "filter2d": lambda impl: filter2d(X, F, impl=impl),
    "upsample2d": lambda impl: upsample2d(X, F, impl=impl),
    "downsample2d": lambda impl: downsample2d(X, F, impl=impl),
    "bias_act": lambda impl: bias_act(X, torch.ones(4), act="lrelu", impl=impl),
    "conv2d_resample": lambda impl: conv2d_resample(X, W, F, up=2, padding=1, impl=impl),
    "modulated_conv2d": lambda impl: modulated_conv2d(X, W, S, padding=1, impl=impl),
}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_dispatches(op, monkeypatch, no_interpreter):
    run = OPS[op]
    ref = run("ref")
    torch.testing.assert_close(run("auto"), ref)
    with pytest.raises(OpsBackendUnavailable, match=r"impl='ref'"):
        run("triton")  # a CPU tensor without the interpreter
    with pytest.raises(ValueError, match="impl must be one of"):
        run("cuda")
    monkeypatch.setenv(ENV_VAR, "ref")
    torch.testing.assert_close(run("triton"), ref)  # the environment forces the reference over the argument


def test_resolve_impl(no_interpreter):
    assert resolve_impl("auto", X) == "ref"
    assert resolve_impl("ref", X) == "ref"
    with pytest.raises(OpsBackendUnavailable) as err:
        resolve_impl("triton", X)
    assert isinstance(err.value, RuntimeError)
    assert "TRITON_INTERPRET=1" in str(err.value) and "\n" not in str(err.value)


def test_resolve_impl_with_interpreter(interpreter):
    assert resolve_impl("triton", X) == "triton"
    assert resolve_impl("auto", X) == "ref"  # 'auto' only picks the kernels for CUDA tensors


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    meta = torch.empty(2, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    assert resolve_impl("auto", meta) == "triton"


@pytest.mark.parametrize("value", ["ref", "REF", " ref "])
def test_env_forces_ref(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_impl("triton", X) == "ref"
    assert resolve_impl("auto", X) == "ref"


def test_env_auto_or_empty_leaves_argument_in_charge(monkeypatch, no_interpreter):
    for value in ("", "auto"):
        monkeypatch.setenv(ENV_VAR, value)
        with pytest.raises(OpsBackendUnavailable):
            resolve_impl("triton", X)


def test_env_triton_and_invalid_values(monkeypatch, no_interpreter):
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(OpsBackendUnavailable, match=ENV_VAR):
        resolve_impl("auto", X)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_impl("auto", X)
