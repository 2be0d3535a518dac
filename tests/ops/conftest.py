"""tests/ops runs thousands of convolutions on tiny tensors: one intra-op thread is much faster for those (on a
busy 2-core machine, OpenMP synchronisation turns a microsecond conv into tens of milliseconds). Scoped to each
test here and restored afterwards, so other test folders keep torch's default.

The Triton backend is tested on CPU tensors through Triton's interpreter. `triton.jit` reads TRITON_INTERPRET
when a kernel is decorated, and pipeline.ops imports its kernel module only on the first impl='triton' call, so
setting the variable here (before any test runs) is enough even when the caller did not export it.

A Triton kernel that raises falls back to the reference with an `OpsFallbackWarning`, so a Triton-vs-reference
test would compare the reference with itself and pass. The pytest configuration turns that warning into an error
(filterwarnings "error::pipeline.ops.OpsFallbackWarning"; by hand: `-W error::pipeline.ops.OpsFallbackWarning`);
tests of the fallback itself record it with `pytest.warns`, which shows every warning whatever the filters say.
The once-per-process flag is re-armed around every test, so that no test depends on which one warned first."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.ops import _dispatch

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported, which is later


@pytest.fixture(autouse=True)
def _single_thread_for_tiny_tensors(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _fallback_warning_rearmed():
    _dispatch.reset_fallback_warning()
    yield
    _dispatch.reset_fallback_warning()


@pytest.fixture
def interpreter(monkeypatch):
    """Skip unless the Triton backend can run on CPU tensors (triton installed, interpreter on)."""
    monkeypatch.delenv("GANPIPE_OPS_IMPL", raising=False)
    reason = _dispatch.triton_unavailable_reason(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
