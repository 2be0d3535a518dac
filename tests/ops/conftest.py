"""tests/ops runs thousands of convolutions on tiny tensors: one intra-op thread is much faster for those (on a
busy 2-core machine, OpenMP synchronisation turns a microsecond conv into tens of milliseconds). Scoped to each
test here and restored afterwards, so other test folders keep torch's default.

The Triton backend is tested on CPU tensors through Triton's interpreter. `triton.jit` reads TRITON_INTERPRET
when a kernel is decorated, and pipeline.ops imports its kernel module only on the first impl='triton' call, so
setting the variable here (before any test runs) is enough even when the caller did not export it."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _single_thread_for_tiny_tensors(one_torch_thread):
    yield


@pytest.fixture
def interpreter(monkeypatch):
    """Skip unless the Triton backend can run on CPU tensors (triton installed, interpreter on)."""
    from pipeline.ops._dispatch import triton_unavailable_reason

    monkeypatch.delenv("GANPIPE_OPS_IMPL", raising=False)
    reason = triton_unavailable_reason(torch.empty(0))
    if reason is not None:
        pytest.skip(reason)
